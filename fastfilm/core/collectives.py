"""Where a tensor for a collective of the default process group must live.

The trainer creates the group with NCCL on a GPU (fastfilm/train.py `setup_distributed`), which takes CUDA tensors
only ("No backend type associated with device type cpu"), and with gloo on a CPU. Counters kept on the host (the
evaluation's tallies, a checkpoint's all-ranks-wrote flag) are moved to `collective_device()` for the collective.
"""

from __future__ import annotations

import torch


def collective_device() -> torch.device:
    """The CPU where the default group's backend takes CPU tensors (gloo, mpi, ucc, or a "cpu:gloo,cuda:nccl"
    pair) or no group exists; else this rank's current GPU (NCCL)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if any(name in backend for name in ("gloo", "mpi", "ucc")) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
