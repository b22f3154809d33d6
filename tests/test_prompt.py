"""`fastfilm predict --interactive`: a prompt that answers questions about an image and exits on end of input."""

import io
import os
import subprocess
import sys

import torch

from fastfilm.config import Config, ModelConfig
from fastfilm.data.tokenize import vocab_hash
from fastfilm.files.export import load_model_folder
from fastfilm.files.original import write_model_folder
from fastfilm.model import FiLMModel
from fastfilm.prompt import Answerer, interact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixel_model_folder(tmp_path):
    words = ["What", "color", "is", "the", "cube", "How", "many", "things", "are", "there"]
    q = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, **{w: i + 4 for i, w in enumerate(sorted(words))}}
    a = {
        "<NULL>": 0,
        "<START>": 1,
        "<END>": 2,
        "<UNK>": 3,
        "red": 4,
        "blue": 5,
        "2": 6,
        "3": 7,
        "yes": 8,
        "no": 9,
    }
    vocab = {"question_token_to_idx": q, "answer_token_to_idx": a, "question_family_names": {}}
    vocab["hash"] = vocab_hash(q, a)
    cfg = ModelConfig(
        image_size=32,
        stem_num_layers=2,
        module_dim=8,
        num_blocks=2,
        wordvec_dim=8,
        rnn_hidden_dim=12,
        classifier_proj_dim=16,
        classifier_fc_dims=[16],
    )
    torch.manual_seed(0)
    return write_model_folder(
        FiLMModel(cfg, len(q), len(a)).eval(), Config(model=cfg), vocab, str(tmp_path / "m")
    )


def png(tmp_path, name, colour):
    from PIL import Image

    path = str(tmp_path / name)
    Image.new("RGB", (48, 32), colour).save(path)
    return path


def test_prompt_answers_two_questions_and_exits_on_end_of_input(tmp_path):
    folder = pixel_model_folder(tmp_path)
    img, img2 = png(tmp_path, "a.png", (200, 30, 30)), png(tmp_path, "b.png", (20, 30, 200))
    model, cfg, vocab = load_model_folder(folder)
    answerer = Answerer(model, cfg, vocab)
    text = (
        "What color is the cube?\n\nHow many zebras are there?\n:image "
        + img2
        + "\nHow many things are there?\n"
    )
    out = io.StringIO()
    assert interact(answerer, img, stdin=io.StringIO(text), stdout=out) == 0  # returns at end of input
    lines = out.getvalue().splitlines()
    answers = [x for x in lines if "answer: " in x]
    assert len(answers) == 2  # the question with an unknown word is not answered
    assert any("'zebras'" in x and "vocabulary" in x for x in lines)
    assert any("now asking about " + img2 in x for x in lines)
    # The top-5 lines after each answer: 5 answers with probabilities, the first the answer.
    first = lines.index(next(x for x in lines if "answer: " in x))
    top = [x.split() for x in lines[first + 1 : first + 6]]
    assert answers[0].endswith(" " + top[0][0]) and len(top) == 5 and all(0 <= float(p) <= 1 for _, p in top)
    # The answers equal the model's on the same input.
    answerer.load(img2)
    expected = answerer.ask("How many things are there?")[0][0]
    assert answers[1].endswith(" " + expected)
    # --allow-unknown answers the question with the unknown word too.
    out = io.StringIO()
    interact(
        answerer,
        img,
        allow_unknown=True,
        stdin=io.StringIO("How many zebras are there?\n:quit\n"),
        stdout=out,
    )
    assert "answer: " in out.getvalue()


def test_interactive_command_line(tmp_path):
    folder = pixel_model_folder(tmp_path)
    img = png(tmp_path, "a.png", (200, 30, 30))
    cmd = [sys.executable, "-m", "fastfilm", "predict", "--model", folder, "--image", img, "--interactive"]
    r = subprocess.run(
        cmd,
        input="What color is the cube?\nHow many things are there?\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("answer: ") == 2
    r = subprocess.run(
        [sys.executable, "-m", "fastfilm", "predict", "--model", folder, "--image", img],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "--interactive" in r.stderr and r.stderr.count("\n") == 1


def test_feature_stem_model_reads_the_image_through_resnet(tmp_path, capsys):
    from fastfilm.cli import main
    from fastfilm.errors import UsageError
    from fastfilm.files.features import ResNetTrunk

    q = {
        "<NULL>": 0,
        "<START>": 1,
        "<END>": 2,
        "<UNK>": 3,
        "How": 4,
        "many": 5,
        "things": 6,
        "are": 7,
        "there": 8,
    }
    a = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, "2": 4, "3": 5}
    vocab = {"question_token_to_idx": q, "answer_token_to_idx": a, "question_family_names": {}}
    vocab["hash"] = vocab_hash(q, a)
    cfg = ModelConfig(
        stem="features",
        module_dim=8,
        num_blocks=1,
        wordvec_dim=8,
        rnn_hidden_dim=12,
        classifier_proj_dim=8,
        classifier_fc_dims=[8],
    )
    c = Config(model=cfg)
    c.data.image_source = "features"
    torch.manual_seed(0)
    folder = write_model_folder(FiLMModel(cfg, len(q), len(a)).eval(), c, vocab, str(tmp_path / "m"))
    torch.save(ResNetTrunk().state_dict(), str(tmp_path / "rn.pth"))
    img = png(tmp_path, "a.png", (90, 90, 90))
    model, mcfg, v = load_model_folder(folder)
    try:
        Answerer(model, mcfg, v)
        raise AssertionError("a feature-stem model without --resnet-weights was accepted")
    except UsageError as e:
        assert "--resnet-weights" in str(e)
    args = ["predict", "--model", folder, "--image", img, "--resnet-weights", str(tmp_path / "rn.pth")]
    assert main([*args, "--question", "How many things are there?"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0].split()[0] in a


def test_one_question_names_unknown_words_and_refuses_bad_options(tmp_path, capsys):
    """`predict --question` (no prompt) on a raw-pixel model: unknown words are named and not answered, as the
    README says; an empty question and --top < 1 are one line, exit 2 (were answered / a traceback)."""
    from fastfilm.cli import main as cli

    folder, img = pixel_model_folder(tmp_path), png(tmp_path, "a.png", (200, 30, 30))
    base = ["predict", "--model", folder, "--image", img]
    cases = [
        (["--question", "How many zebras are there?"], "'zebras'"),
        (["--question", "  "], "--question"),
        (["--question", "How many things are there?", "--top", "0"], "--top 0"),
        (["--question", "How many things are there?", "--top", "-3"], "--top -3"),
    ]
    for extra, expected in cases:
        assert cli(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert cli(base + ["--question", "How many zebras are there?", "--allow-unknown", "--top", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_prompt_answers_under_the_models_autocast(tmp_path):
    folder = pixel_model_folder(tmp_path)
    model, cfg, vocab = load_model_folder(folder)
    cfg.deepspeed["bf16"] = {"enabled": True}
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_autocast_dtype("cpu")))
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    answerer = Answerer(model, cfg, vocab, precision="model")  # "auto" would run fp32 on a CPU without bf16
    answerer.load(png(tmp_path, "a.png", (200, 30, 30)))
    answerer.ask("How many things are there?")
    assert seen == [torch.bfloat16, True]


def autocast_spy(monkeypatch) -> list:
    """Record (autocast on, dtype) at each FiLMModel forward on the CPU."""
    from fastfilm.model import FiLMModel as Model

    seen, forward = [], Model.forward

    def spy(self, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *a, **k)

    monkeypatch.setattr(Model, "forward", spy)
    return seen


def as_avx2_cpu(monkeypatch) -> None:
    from fastfilm import auto

    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": "AVX2 CPU", "flags": frozenset({"avx2", "fma"})})
    monkeypatch.setattr(auto, "cpu_capability", lambda: "AVX2")


def test_predict_runs_a_bf16_model_in_fp32_on_a_cpu_without_bf16_and_says_so(tmp_path, capsys, monkeypatch):
    from fastfilm.cli import main as cli

    model, cfg, vocab = load_model_folder(pixel_model_folder(tmp_path))
    cfg.deepspeed["bf16"] = {"enabled": True}
    folder = write_model_folder(model, cfg, vocab, str(tmp_path / "bf16"))
    as_avx2_cpu(monkeypatch)
    seen = autocast_spy(monkeypatch)
    argv = [
        "predict",
        "--model",
        folder,
        "--image",
        png(tmp_path, "a.png", (9, 9, 9)),
        "--question",
        "How many",
    ]
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert [on for on, _ in seen] == [False]  # no autocast: float32
    assert "precision: fp32 (the model's bf16, but this CPU has no bf16 instructions" in err
    assert "--precision model keeps it" in err
    del seen[:]
    assert cli([*argv, "--precision", "model"]) == 0
    assert seen == [(True, torch.bfloat16)] and "precision" not in capsys.readouterr().err


def test_resnet_weights_given_to_a_pixel_model_are_named_as_unused(tmp_path, capsys):
    from fastfilm.cli import main as cli

    folder, img = pixel_model_folder(tmp_path), png(tmp_path, "a.png", (200, 30, 30))
    argv = ["predict", "--model", folder, "--image", img, "--question", "How many things are there?"]
    assert cli([*argv, "--resnet-weights", str(tmp_path / "never-read.pth")]) == 0
    assert "--resnet-weights is not used: this model reads the image's pixels" in capsys.readouterr().err


def test_python_predict_is_the_models_softmax(tmp_path):
    from fastfilm.data.tokenize import encode_question
    from fastfilm.files.export import load_image
    from fastfilm.prompt import predict

    model, cfg, vocab = load_model_folder(pixel_model_folder(tmp_path))
    image = png(tmp_path, "a.png", (200, 30, 30))
    question = "What color is the cube"
    top = predict(model, cfg, vocab, image, question, top=3)
    ids = torch.tensor([encode_question(question, vocab)])
    with torch.no_grad():
        probs = torch.softmax(model(load_image(image, 32), ids, torch.tensor([ids.shape[1]])), 1)[0]
    names = {v: k for k, v in vocab["answer_token_to_idx"].items()}
    p, i = probs.topk(3)
    assert [a for a, _ in top] == [names[int(j)] for j in i]
    torch.testing.assert_close(torch.tensor([q for _, q in top]), p)


def test_the_answerer_feeds_the_model_on_the_models_device(tmp_path):
    """The Python API may hand over a model on a GPU: the image (loaded on the CPU) and the question go to the
    model's device, and autocast is entered for that device. A CPU stand-in reports a device it is not on."""
    folder = pixel_model_folder(tmp_path)
    model, cfg, vocab = load_model_folder(folder)
    seen = []

    class Elsewhere(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def parameters(self, recurse=True):
            yield torch.empty(0, device="meta")

        def forward(self, image, ids, lengths):
            seen.append((image.device.type, ids.device.type, lengths.device.type))
            return torch.zeros(1, 3)

    answerer = Answerer(Elsewhere(), cfg, vocab)
    answerer.load(png(tmp_path, "a.png", (200, 30, 30)))
    answerer.ask("How many things are there?", top=2)
    assert seen == [("meta", "meta", "cpu")]  # lengths stay on the host, as the model reads them there
