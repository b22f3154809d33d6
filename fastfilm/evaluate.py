"""Evaluation: accuracy overall and per question family, exact over the split (`fastfilm eval`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from fastfilm.core.precision import autocast
from fastfilm.core.progress import progress_bar
from fastfilm.data.tokenize import SPECIAL_TOKENS, UNK

# The id prep gives an answer the training answers lack (never a training target).
UNK_ANSWER = SPECIAL_TOKENS[UNK]
MAX_FAMILIES = 1024  # question_family_index values 0..1023; -1 (prep: not in the questions file) is "unknown"
UNKNOWN_FAMILY = "unknown"


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    family_names: dict | list | None = None,
    max_questions: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of `model` on every question the loader yields (summed over ranks when distributed), or with
    `max_questions` on exactly the split's first `max_questions` (the same ones on any number of ranks); with
    `progress`, a tqdm bar of this rank's batches on stderr (rank 0 only).

    Returns {"accuracy", "correct", "total", "families": {name: {"accuracy", "correct", "total"}}}; questions
    without a family (-1) are counted in their own row, "unknown". A question whose answer is not in the
    training answers (prep encodes it as `<UNK>`) is always wrong, as CLEVR's answer-file scoring counts it.
    """
    import torch.distributed as dist

    from fastfilm.core.collectives import collective_device
    from fastfilm.core.errors import DataError

    model.eval()
    correct = torch.zeros(MAX_FAMILIES + 1, dtype=torch.float64)  # the last slot: unknown family
    total = torch.zeros(MAX_FAMILIES + 1, dtype=torch.float64)
    seen, quota = 0, shard_quota(loader, max_questions)
    with progress_bar(loader, max_questions, progress) as bar:  # closed (cleared) on an error too
        for batch in loader.epoch(0):
            if quota is not None and seen >= quota:
                break
            if quota is not None and quota - seen < len(batch["answer"]):  # the last of this shard's quota
                batch = {k: v[: quota - seen] for k, v in batch.items()}
            bar.update(1)
            answers = batch["answer"]
            if (answers < 0).any():
                raise DataError(
                    f"{loader.split}: this split has no answers (as CLEVR's test split): it cannot be scored "
                    "(`--predictions FILE` writes its answers)"
                )
            with autocast(device, amp_dtype):
                logits = model(batch["image"].to(device), batch["question"].to(device), batch["length"])
            _tally(correct, total, logits.argmax(1).cpu(), answers, batch["family"], loader.split)
            seen += answers.numel()
    if dist.is_available() and dist.is_initialized():
        both = torch.stack([correct, total]).to(collective_device())  # NCCL takes no host tensor
        dist.all_reduce(both)
        correct, total = both.cpu()
    return _summary(correct, total, family_names)


def shard_quota(loader, max_questions: int) -> int | None:
    """With `max_questions`: how many of the split's first `max_questions` questions (in the loader's order, the
    same for any number of ranks) this shard holds; they are the first it yields. None: the whole split."""
    if not max_questions:
        return None
    import numpy as np

    return int(np.isin(loader.rows(0), loader.order(0)[:max_questions]).sum())


def score_predictions(
    pred: torch.Tensor,
    answers: torch.Tensor,
    families: torch.Tensor,
    family_names: dict | list | None,
    split: str,
) -> dict[str, Any]:
    """`evaluate`'s result for predicted answer ids already computed (`eval --predictions`: one pass, not two)."""
    correct = torch.zeros(MAX_FAMILIES + 1, dtype=torch.float64)
    total = torch.zeros(MAX_FAMILIES + 1, dtype=torch.float64)
    _tally(correct, total, pred.long(), answers.long(), families.long(), split)
    return _summary(correct, total, family_names)


def _tally(
    correct: torch.Tensor,
    total: torch.Tensor,
    pred: torch.Tensor,
    answers: torch.Tensor,
    fam: torch.Tensor,
    split,
) -> None:
    """Add the hits and counts of predicted answers to the per-family sums (the last slot: no family)."""
    from fastfilm.core.errors import DataError

    if (fam >= MAX_FAMILIES).any():
        raise DataError(f"{split}: question_family_index {int(fam.max())} >= {MAX_FAMILIES}")
    hit = ((pred == answers) & (answers != UNK_ANSWER)).double()
    fam = torch.where(fam < 0, MAX_FAMILIES, fam)
    correct.index_add_(0, fam, hit)
    total.index_add_(0, fam, torch.ones_like(hit))


def _summary(correct: torch.Tensor, total: torch.Tensor, family_names: dict | list | None) -> dict[str, Any]:
    """The per-family sums as `evaluate`'s result dict."""
    names = family_names or {}
    if isinstance(names, list):
        names = dict(enumerate(names))
    names = {int(k): v for k, v in names.items()}
    families: dict[str, dict[str, float]] = {}
    for f in torch.nonzero(total).flatten().tolist():
        name = UNKNOWN_FAMILY if f == MAX_FAMILIES else names.get(f, f"family_{f}")
        entry = families.setdefault(name, {"correct": 0, "total": 0})
        entry["correct"] += int(correct[f])
        entry["total"] += int(total[f])
    for entry in families.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    c, t = int(correct.sum()), int(total.sum())
    return {
        "accuracy": c / t if t else 0.0,
        "correct": c,
        "total": t,
        "families": dict(sorted(families.items())),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a console table: one row per question family, then the overall line."""
    rows = [f"{'family':<28} {'accuracy':>9} {'correct':>9} {'total':>9}"]
    for name, e in result["families"].items():
        rows.append(f"{name:<28} {100 * e['accuracy']:>8.2f}% {e['correct']:>9} {e['total']:>9}")
    rows.append(
        f"{'overall':<28} {100 * result['accuracy']:>8.2f}% {result['correct']:>9} {result['total']:>9}"
    )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """`fastfilm eval`: evaluate a checkpoint on a split, print the table, optionally write JSON."""
    from fastfilm.auto import PRECISION_DTYPES, prepare_inference, use_per_cpu_build_dirs
    from fastfilm.core.errors import check_output_file
    from fastfilm.data import loader_for
    from fastfilm.files.checkpoint import atomic_write_json, find_checkpoint
    from fastfilm.files.export import load_model_folder

    for option in ("json", "predictions", "predictions_json"):  # before the split is evaluated
        if getattr(args, option, None):
            check_output_file(getattr(args, option), "--" + option.replace("_", "-"))
    folder = find_checkpoint(args.checkpoint, args.tag, tag_option="--tag")
    use_per_cpu_build_dirs()  # --kernels compile: inductor's cache per CPU kind
    model, cfg, vocab = load_model_folder(folder, kernels=args.kernels)
    if getattr(args, "cache", None):  # eval --cache: another prepared cache (e.g. a zero-shot question set)
        from fastfilm.predictions import check_same_vocab

        cfg.data.cache = args.cache
        check_same_vocab(args.cache, vocab)  # the cache's ids must be the model's words
    else:
        from fastfilm.core.errors import check_model_cache

        check_model_cache(cfg.data.cache, folder)
    device, precision = prepare_inference(model, cfg, getattr(args, "precision", "auto"))
    amp_dtype = PRECISION_DTYPES[precision.value]
    loader = loader_for(cfg, args.split, train=False, device=device)
    if getattr(args, "predictions", None) or getattr(args, "predictions_json", None):
        from fastfilm.predictions import write_for_eval  # issue 17: answer files in CLEVR's format

        predicted = write_for_eval(args, model, cfg, vocab, loader, device, amp_dtype)
        if predicted is None:
            if args.json:  # a split without answers (CLEVR's test): predictions only, no accuracy
                print(
                    f"fastfilm: note: --json {args.json} not written: {args.split} has no answers to score",
                    file=sys.stderr,
                )
            return 0
        # scored from the predictions' own pass (not a second one over the split)
        result = score_predictions(*predicted, vocab.get("question_family_names"), args.split)
    else:
        result = evaluate(
            model,
            loader,
            device,
            amp_dtype,
            vocab.get("question_family_names"),
            progress=True,
        )
    expected = loader.total
    result["split"], result["checkpoint"] = args.split, folder
    # what the accuracy was measured with
    result["device"], result["precision"] = device.type, precision.value
    print(format_table(result))
    if result["total"] != expected:
        print(f"fastfilm: evaluated {result['total']} questions, the split has {expected}", file=sys.stderr)
        return 1
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_json(args.json, result)
    return 0
