"""Evaluation: accuracy overall and per question family, exact over the split (`fastfilm eval`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

import torch


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    family_names: dict | list | None = None,
    max_questions: int = 0,
) -> dict[str, Any]:
    """Accuracy of `model` on every question the loader yields (summed over ranks when distributed).

    Returns {"accuracy", "correct", "total", "families": {name: {"accuracy", "correct", "total"}}}.
    """
    import torch.distributed as dist

    model.eval()
    n_fam = 1024
    correct = torch.zeros(n_fam, dtype=torch.float64)
    total = torch.zeros(n_fam, dtype=torch.float64)
    seen = 0
    for batch in loader.epoch(0):
        answers = batch["answer"]
        if (answers < 0).any():
            raise ValueError("this split has no answers (CLEVR's test split): it cannot be evaluated")
        with _autocast(device, amp_dtype):
            logits = model(batch["image"].to(device), batch["question"].to(device), batch["length"])
        hit = (logits.argmax(1).cpu() == answers).double()
        fam = batch["family"].clamp(0, n_fam - 1)
        correct.index_add_(0, fam, hit)
        total.index_add_(0, fam, torch.ones_like(hit))
        seen += answers.numel()
        if max_questions and seen >= max_questions:
            break
    if dist.is_available() and dist.is_initialized():
        both = torch.stack([correct, total])
        dist.all_reduce(both)
        correct, total = both[0], both[1]
    names = family_names or {}
    if isinstance(names, list):
        names = dict(enumerate(names))
    names = {int(k): v for k, v in names.items()}
    families: dict[str, dict[str, float]] = {}
    for f in torch.nonzero(total).flatten().tolist():
        name = names.get(f, f"family_{f}")
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
    from fastfilm.checkpoint import find_checkpoint
    from fastfilm.data import build_loader, load_split
    from fastfilm.export import load_model_folder

    folder = find_checkpoint(args.checkpoint, args.tag)
    model, cfg, vocab = load_model_folder(folder, kernels=args.kernels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    dc = cfg.data
    loader = build_loader(
        dc.cache,
        args.split,
        cfg.batch_size,
        image_source=dc.image_source,
        clevr_dir=dc.root,
        image_size=cfg.model.image_size,
        shuffle=False,
        drop_last=False,
        device_id=device.index if device.type == "cuda" else None,
        num_threads=dc.num_threads,
    )
    amp = torch.bfloat16 if cfg.deepspeed.get("bf16", {}).get("enabled") else None
    result = evaluate(model, loader, device, amp, vocab.get("question_family_names"))
    expected = len(load_split(dc.cache, args.split)["answers"])
    result["split"], result["checkpoint"] = args.split, folder
    print(format_table(result))
    if result["total"] != expected:
        print(f"fastfilm: evaluated {result['total']} questions, the split has {expected}", file=sys.stderr)
        return 1
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
