"""Predicted answers of a whole split, in the questions file's order (`fastfilm eval --predictions FILE`).

`--predictions FILE` writes one predicted answer per line, line i for question i of
`questions/CLEVR_{split}_questions.json`: the answer file the original's `scripts/run_model.py --output_preds`
writes and `CLEVR_eval_with_q_type.py` (or CLEVR's test server) reads. It works for a split without answers
(CLEVR's test split), where no accuracy is printed. `--predictions-json FILE` writes one JSON object per line:
question index, image file, question text, predicted answer, the top 5 answers with their probabilities and,
where the split has answers, the expected answer.

A cache that skipped questions (their image was missing at `fastfilm prep`) cannot line up with the questions
file: refused, naming the split. So is a cache whose vocabulary differs from the model's.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import torch

from fastfilm.core.errors import DataError
from fastfilm.core.precision import autocast
from fastfilm.core.progress import progress_bar


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    top: int = 5,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Argmax and top-k (ids, probabilities) for every question of the loader's split, in the split's row order
    (with `progress`, a tqdm bar on stderr)."""
    model.eval()
    with progress_bar(loader, 0, progress) as bar:  # closed (cleared) on an error too
        n = loader.total
        pred = np.full(n, -1, np.int64)
        k = None
        top_idx = top_prob = None
        for batch in loader.epoch(0):
            bar.update(1)
            with autocast(device, amp_dtype):  # as `evaluate`, so the argmax is the one it scores
                logits = model(batch["image"].to(device), batch["question"].to(device), batch["length"])
            logits = logits.float().cpu()
            rows = batch["index"].numpy()
            if k is None:
                k = min(top, logits.shape[1])
                top_idx, top_prob = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
            p, i = torch.softmax(logits, 1).topk(k, dim=1)
            pred[rows] = logits.argmax(1).numpy()
            top_idx[rows], top_prob[rows] = i.numpy(), p.numpy()
    if (pred < 0).any():
        raise DataError(f"{loader.split}: {int((pred < 0).sum())} of {n} questions got no prediction")
    return {"pred": pred, "top_idx": top_idx, "top_prob": top_prob}


def _atomic_text(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_same_vocab(cache_dir: str, model_vocab: dict) -> None:
    """Refuse a cache whose vocabulary is not the model's (its ids would mean other words)."""
    from fastfilm.data import load_vocab

    if load_vocab(cache_dir)["hash"] != model_vocab.get("hash"):
        raise DataError(
            f"{cache_dir}/vocab.json is not the model's vocabulary: prepare the data with "
            "`fastfilm prep --vocab-from MODEL_DIR` so that the ids mean the same words"
        )


def check_lines_up(cache_dir: str, split: str, model_vocab: dict) -> None:
    """Refuse a cache whose rows are not the questions file's questions, or whose vocabulary is not the model's."""
    check_same_vocab(cache_dir, model_vocab)
    try:
        with open(os.path.join(cache_dir, "manifest.json"), encoding="utf-8") as f:
            stats = json.load(f)["splits"][split]["stats"]
    except (OSError, ValueError, KeyError):
        return
    if stats.get("skipped_missing_image"):
        raise DataError(
            f"{cache_dir}: {stats['skipped_missing_image']} {split} question(s) were skipped at prep (missing "
            "images), so the predictions could not follow the questions file line for line"
        )


def write_for_eval(
    args: argparse.Namespace,
    model: torch.nn.Module,
    cfg: Any,
    vocab: dict,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`fastfilm eval --predictions/--predictions-json`: write the files; return (predicted answer ids, answers,
    families) of the split's questions (the model under `amp_dtype` autocast), for `fastfilm.evaluate.score_predictions` to score (one pass of the model,
    not two), or None for a split without answers."""
    from fastfilm.data import load_split
    from fastfilm.data.prep import questions_path, read_questions

    dc = cfg.data
    check_lines_up(dc.cache, args.split, vocab)
    arrays = load_split(dc.cache, args.split)
    out = predict_split(model, loader, device, amp_dtype, progress=True)
    names = {v: k for k, v in vocab["answer_token_to_idx"].items()}
    answers = [names.get(int(i), str(int(i))) for i in out["pred"]]
    if args.predictions:
        _atomic_text(args.predictions, answers)
        print(f"predictions: {len(answers)} answers → {args.predictions}")
    if args.predictions_json:
        qfile = questions_path(dc.root, args.split)
        texts = (
            [q["question"] for q in read_questions(qfile, args.split)[0]] if os.path.isfile(qfile) else None
        )
        if texts is not None and len(texts) != len(answers):
            texts = None
        idx_to_word = {v: k for k, v in vocab["question_token_to_idx"].items()}
        files = arrays["image_files"]
        lines = []
        for r in range(len(answers)):
            if texts is not None:
                text = texts[r]
            else:  # no questions file: the tokens as the model read them
                ids = arrays["questions"][r][1 : int(arrays["lengths"][r]) - 1]
                text = " ".join(idx_to_word.get(int(i), "<UNK>") for i in ids)
            rec = {
                "question_index": int(arrays["question_index"][r]),
                "image": str(files[int(arrays["image_index"][r])]),
                "question": text,
                "answer": answers[r],
                "top5": [
                    [names.get(int(i), str(int(i))), round(float(p), 6)]
                    for i, p in zip(out["top_idx"][r], out["top_prob"][r])
                ],
            }
            if arrays["answers"][r] >= 0:
                rec["expected"] = names.get(int(arrays["answers"][r]), "<UNK>")
            lines.append(json.dumps(rec))
        _atomic_text(args.predictions_json, lines)
        print(f"predictions: {len(lines)} records → {args.predictions_json}")
    if not bool((arrays["answers"] >= 0).all()):
        print(f"{args.split}: no answers in this split: predictions written, no accuracy")
        return None
    return (
        torch.from_numpy(out["pred"]),
        torch.from_numpy(arrays["answers"]),
        torch.from_numpy(arrays["family"]),
    )
