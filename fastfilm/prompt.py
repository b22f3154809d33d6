"""`fastfilm predict`: answer a question about an image with an exported model, or (`--interactive`) many at a prompt.

With `--interactive`, as the original's `scripts/run_model.py` without `--question`: the image is read (and, for
a feature-stem model, run through ResNet-101 once, with `--resnet-weights`) and every line typed is a question; the
answer and the top 5 answers with their probabilities come back. `:image PATH` switches to another image, `:quit`
or end of input (Ctrl-D) ends. Words outside the training vocabulary are named and the question is not answered
(the original's `--enforce_clevr_vocab 1`), unless `--allow-unknown` (then they are read as `<UNK>`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import torch

from fastfilm.core.errors import UsageError

HELP = "type a question; ':image PATH' for another image; ':quit' or end of input (Ctrl-D) to stop"


class Answerer:
    """A loaded model and one image's input: `ask(question)` → top (answer, probability) pairs, the model under
    `precision` (`fastfilm.auto.inference_precision`, decided for the device the model is on when asked)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Any,
        vocab: dict,
        resnet_weights: str | None = None,
        precision: str = "auto",
    ):
        self.model, self.cfg, self.vocab = model.eval(), cfg, vocab
        self.precision = precision
        self._choices: dict[torch.device, Any] = {}
        self.q2i = vocab["question_token_to_idx"]
        self.idx_to_answer = {v: k for k, v in vocab["answer_token_to_idx"].items()}
        self.trunk = None
        if cfg.model.stem == "features":
            if not resnet_weights:
                raise UsageError(
                    "this model reads ResNet-101 features: pass --resnet-weights FILE (see `fastfilm features`)"
                )
            from fastfilm.files.features import load_trunk

            self.trunk = load_trunk(resnet_weights)
        self.image: torch.Tensor | None = None

    @torch.no_grad()
    def load(self, path: str) -> None:
        """Read an image as the model sees it (pixels, or ResNet features)."""
        if self.trunk is not None:
            from fastfilm.files.features import preprocess

            self.image = self.trunk(torch.from_numpy(preprocess(path))[None])
        else:
            from fastfilm.files.export import load_image

            self.image = load_image(path, self.cfg.model.image_size)

    def choice(self, device: torch.device) -> Any:
        """The precision `Choice` on `device` (decided once per device)."""
        if device not in self._choices:
            from fastfilm.auto import inference_precision

            self._choices[device] = inference_precision(self.cfg, device, self.precision)
        return self._choices[device]

    def unknown_words(self, question: str) -> list[str]:
        """The question's words that the training vocabulary lacks."""
        from fastfilm.data.tokenize import tokenize

        return list(dict.fromkeys(t for t in tokenize(question) if t not in self.q2i))

    @torch.no_grad()
    def ask(self, question: str, top: int = 5) -> list[tuple[str, float]]:
        """The top answers to `question` about the current image."""
        from fastfilm.auto import PRECISION_DTYPES
        from fastfilm.core.precision import autocast
        from fastfilm.data.tokenize import encode_question

        # on the model's device (the Python API may hand over a model on a GPU; the trunk and the image loader
        # work on the CPU), under the precision eval would choose there
        device = next(self.model.parameters()).device
        ids = torch.tensor([encode_question(question, self.vocab)], dtype=torch.long, device=device)
        with autocast(device, PRECISION_DTYPES[self.choice(device).value]):
            logits = self.model(self.image.to(device), ids, torch.tensor([ids.shape[1]]))
        probs = torch.softmax(logits.float(), dim=1)[0]
        p, i = probs.topk(min(top, probs.numel()))
        return [(self.idx_to_answer.get(int(j), str(int(j))), float(q)) for q, j in zip(p, i)]


def interact(
    answerer: Answerer,
    image: str,
    *,
    top: int = 5,
    allow_unknown: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """The prompt loop: questions in, answers out, until `:quit` or end of input; returns 0."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    answerer.load(image)
    say(f"Ask me something about {image} ({HELP}).")
    while True:
        stdout.write(">>> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            say()
            break
        text = line.strip()
        if not text:
            continue
        if text in (":quit", ":q", ":exit"):
            break
        if text.startswith(":image"):
            path = text[len(":image") :].strip()
            try:
                answerer.load(path)
            except Exception as e:  # a bad path keeps the current image
                say(f"cannot use that image: {e}")
                continue
            image = path
            say(f"now asking about {image}")
            continue
        if text.startswith(":"):
            say(HELP)
            continue
        unknown = answerer.unknown_words(text)
        if unknown and not allow_unknown:
            names = ", ".join(f"'{w}'" for w in unknown)
            say(
                f"No one taught me {names} (not in the training vocabulary); rephrase, or use --allow-unknown"
            )
            continue
        answers = answerer.ask(text, top)
        say(f"answer: {answers[0][0]}")
        for a, p in answers:
            say(f"  {a:<12} {p:.4f}")
    return 0


def run_interactive(args: argparse.Namespace) -> int:
    """`fastfilm predict --interactive` (or, without it, one question, e.g. to a feature-stem model with
    `--resnet-weights`)."""
    from fastfilm.files.export import load_model_folder

    model, cfg, vocab = load_model_folder(args.model, kernels="reference")
    if cfg.model.stem == "pixels" and getattr(args, "resnet_weights", None):
        print(
            "fastfilm: note: --resnet-weights is not used: this model reads the image's pixels",
            file=sys.stderr,
        )
    from fastfilm.auto import announce_precision

    weights, precision = getattr(args, "resnet_weights", None), getattr(args, "precision", "auto")
    answerer = Answerer(model, cfg, vocab, weights, precision)
    announce_precision(answerer.choice(next(model.parameters()).device), cfg)
    allow = getattr(args, "allow_unknown", False)
    if not getattr(args, "interactive", False):
        answerer.load(args.image)
        unknown = answerer.unknown_words(args.question)
        if unknown and not allow:
            raise UsageError(
                f"predict: {', '.join(repr(w) for w in unknown)} not in the training vocabulary (--allow-unknown "
                "reads them as <UNK>)"
            )
        for answer, p in answerer.ask(args.question, args.top):
            print(f"{answer:<12} {p:.4f}")
        return 0
    return interact(answerer, args.image, top=args.top, allow_unknown=allow)


def predict(
    model: torch.nn.Module,
    cfg: Any,
    vocab: dict,
    image: str,
    question: str,
    top: int = 5,
    resnet_weights: str | None = None,
    precision: str = "auto",
) -> list[tuple[str, float]]:
    """The top-k (answer, probability) pairs for one image and one question (Python API of `fastfilm predict`;
    a features model needs the ResNet-101 weights its features came from; `precision` as `--precision`)."""
    answerer = Answerer(model, cfg, vocab, resnet_weights, precision)
    answerer.load(image)
    return answerer.ask(question, top)


def run_predict(args: argparse.Namespace) -> int:
    """`fastfilm predict`: print the top answers with their probabilities (or, with --interactive, a prompt)."""
    interactive = getattr(args, "interactive", False)
    if args.question is None and not interactive:
        raise UsageError("predict: give --question TEXT, or --interactive for a prompt")
    if args.question is not None and not args.question.strip() and not interactive:
        raise UsageError(
            "predict --question: empty (expected a question such as 'How many cubes are there?')"
        )
    if args.top < 1:
        raise UsageError(f"predict --top {args.top}: expected an integer >= 1")
    return run_interactive(args)
