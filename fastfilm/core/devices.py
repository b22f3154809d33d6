"""The device a one-process job (`eval`, `analyze`, `features`) runs its model on."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """This process's current GPU when CUDA is available (`CUDA_VISIBLE_DEVICES=` keeps a job on the CPU), else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
