"""Export a checkpoint as safetensors + JSON, and answer questions with an exported model (`predict`).

An exported model folder holds `model.safetensors`, `config.json` and `vocab.json`; loading it never unpickles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from fastfilm.config import Config, config_from_dict
from fastfilm.model import FiLMModel

EXPORT_FILES = ("model.safetensors", "config.json", "vocab.json")


def load_model_folder(folder: str, kernels: str | None = None) -> tuple[FiLMModel, Config, dict]:
    """Build the model described by `folder`'s config.json/vocab.json and load its model.safetensors."""
    for name in EXPORT_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(
                f"{folder}: missing {name} (expected a folder written by `fastfilm export`)"
            )
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = config_from_dict(json.load(f), source=os.path.join(folder, "config.json"))
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    model = FiLMModel(
        cfg.model,
        len(vocab["question_token_to_idx"]),
        len(vocab["answer_token_to_idx"]),
        kernels=kernels or cfg.kernels.mode,
    )
    state = load_file(os.path.join(folder, "model.safetensors"))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, cfg, vocab


def run_export(args: argparse.Namespace) -> int:
    """`fastfilm export`: copy a verified checkpoint's weights, config and vocab into an export folder."""
    from fastfilm.checkpoint import find_checkpoint

    folder = find_checkpoint(args.checkpoint, args.tag)
    load_model_folder(folder)  # proves the weights load into the described model before anything is written
    out = args.out
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in EXPORT_FILES:
        shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"exported {folder} → {out}/ ({', '.join(EXPORT_FILES)})")
    return 0


def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG/JPEG as the model sees it: RGB, resized bicubic to size×size, scaled to [0, 1], [1, 3, S, S]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


@torch.no_grad()
def predict(model: FiLMModel, cfg: Config, vocab: dict, image: str, question: str, top: int = 5):
    """The top-k (answer, probability) pairs for one image and one question."""
    from fastfilm.data.tokenize import encode_question

    if cfg.model.stem != "pixels":
        raise ValueError("predict needs a raw-pixel model (stem=pixels); this one reads precomputed features")
    ids = torch.tensor([encode_question(question, vocab)], dtype=torch.long)
    img = load_image(image, cfg.model.image_size)
    probs = torch.softmax(model(img, ids, torch.tensor([ids.shape[1]])).float(), dim=1)[0]
    idx_to_answer = {v: k for k, v in vocab["answer_token_to_idx"].items()}
    p, i = probs.topk(min(top, probs.numel()))
    return [(idx_to_answer.get(int(j), str(int(j))), float(q)) for q, j in zip(p, i)]


def run_predict(args: argparse.Namespace) -> int:
    """`fastfilm predict`: print the top answers with their probabilities."""
    model, cfg, vocab = load_model_folder(args.model, kernels="reference")
    try:
        answers = predict(model, cfg, vocab, args.image, args.question, args.top)
    except ValueError as e:
        print(f"fastfilm: {e}", file=sys.stderr)
        return 2
    for answer, p in answers:
        print(f"{answer:<12} {p:.4f}")
    return 0
