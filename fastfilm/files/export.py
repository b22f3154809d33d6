"""Export a checkpoint as safetensors + JSON (`fastfilm export`), and load an exported model folder back.

An exported model folder holds `model.safetensors`, `config.json` and `vocab.json`; loading it never unpickles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastfilm.core.config import Config, config_from_dict
from fastfilm.core.errors import UsageError
from fastfilm.model import FiLMModel

EXPORT_FILES = ("model.safetensors", "config.json", "vocab.json")


def load_model_folder(folder: str, kernels: str | None = None) -> tuple[FiLMModel, Config, dict]:
    """Build the model described by `folder`'s config.json/vocab.json and load its model.safetensors."""
    from fastfilm.files.checkpoint import CheckpointError

    for name in EXPORT_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            hint = ""
            if os.path.isdir(os.path.join(folder, "checkpoints")):  # a run folder
                best = os.path.join(folder, "checkpoints", "best")
                hint = f"; {folder} is a run folder: give {best}, or `fastfilm export --checkpoint {folder}` first"
            raise CheckpointError(
                f"{folder}: missing {name} (expected a folder written by `fastfilm export`){hint}"
            )

    def read_json(name: str):
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None

    cfg = config_from_dict(read_json("config.json"), source=os.path.join(folder, "config.json"))
    if (kernels or cfg.kernels.mode) == "triton":  # without a GPU: the interpreter, or one line (as train)
        from fastfilm.core.config import KernelsConfig
        from fastfilm.core.kernel_mode import check_kernels_mode

        check_kernels_mode(dataclasses.replace(cfg, kernels=KernelsConfig("triton")))
    vocab = read_json("vocab.json")
    if not isinstance(vocab, dict) or not all(
        isinstance(vocab.get(k), dict) and vocab[k] for k in ("question_token_to_idx", "answer_token_to_idx")
    ):
        raise CheckpointError(
            f"{os.path.join(folder, 'vocab.json')}: expected an object whose question_token_to_idx and "
            "answer_token_to_idx map words to ids (as `fastfilm prep` writes)"
        )
    model = FiLMModel(
        cfg.model,
        len(vocab["question_token_to_idx"]),
        len(vocab["answer_token_to_idx"]),
        kernels=(kernels or cfg.kernels.mode).replace("auto", "reference"),  # auto: decided by a training run
    )
    path = os.path.join(folder, "model.safetensors")
    try:
        model.load_state_dict(load_file(path), strict=True)
    except (OSError, RuntimeError, SafetensorError) as e:  # unreadable, or tensors that do not fit the model
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        first = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        first = first if len(first) <= 300 else first[:300] + "..."
        raise CheckpointError(f"{path}: does not load into the model of config.json ({first})") from None
    model.eval()
    return model, cfg, vocab


# What an export folder may hold: the exported files, a manifest, and import-original's note of its source.
EXPORT_FOLDER_FILES = (*EXPORT_FILES, "manifest.json", "original.json")


def check_export_target(out: str, option: str = "export --out") -> None:
    """Refuse an `--out` that is a file, or a folder holding anything but an earlier export (never deleted)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"{option} {out}: exists and is not a folder (give a new folder)")
    if os.path.isdir(out):
        other = sorted(set(os.listdir(out)) - set(EXPORT_FOLDER_FILES))
        if other:
            raise UsageError(
                f"{option} {out}: holds files that are not an exported model ({', '.join(other[:3])}"
                f"{', ...' if len(other) > 3 else ''}); nothing was written (give a new folder or an earlier export)"
            )


def run_export(args: argparse.Namespace) -> int:
    """`fastfilm export`: copy a verified checkpoint's weights, config and vocab into an export folder (with a
    sha256 manifest, so `eval --checkpoint` takes it). An earlier export at `--out` is replaced; a folder that
    holds anything else is refused."""
    from fastfilm.files.checkpoint import find_checkpoint, write_manifest

    out = os.path.normpath(args.out)
    check_export_target(out)
    folder = find_checkpoint(args.checkpoint, args.tag, tag_option="--tag")
    load_model_folder(folder)  # proves the weights load into the described model before anything is written
    tmp, old = f"{out}.tmp{os.getpid()}", f"{out}.old{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in EXPORT_FILES:
            shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
        write_manifest(tmp)
        if os.path.isdir(out):
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    print(f"exported {folder} → {out}/ ({', '.join(EXPORT_FILES)}, manifest.json)")
    return 0


def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG/JPEG as the model sees it: RGB, resized bicubic to size×size, scaled to [0, 1], [1, 3, S, S]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        from fastfilm.core.errors import DataError

        raise DataError(f"{path}: cannot read the image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
