"""Collectives of the default group get tensors on the device its backend takes: NCCL (the trainer's backend on a
GPU) refuses host tensors, and the evaluation's tallies and a checkpoint's all-ranks-wrote flag live on the host."""

import sys

import pytest
import torch
import torch.distributed as dist

from fastfilm.config import config_from_dict
from fastfilm.core.collectives import collective_device
from tests.test_train import tiny_config


@pytest.mark.parametrize(
    "backend, expected",
    [("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("mpi", "cpu"), (None, "cpu")],
)
def test_the_collective_device_follows_the_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(dist, "is_initialized", lambda: backend is not None)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device(expected)


def test_evaluation_and_checkpoints_reduce_on_the_collective_device(dataset, tmp_path, monkeypatch):
    """A training run (one rank, gloo) that evaluates and saves: each all-reduce's tensor is on the device that
    collective_device() gave (spied: on a CPU that is the CPU, so which modules ask is what is checked)."""
    import fastfilm.core.collectives as collectives
    import fastfilm.files.checkpoint as checkpoint
    from fastfilm.train import train

    callers, reduced = [], []

    def spy():
        callers.append(sys._getframe(1).f_globals["__name__"])
        return collective_device()

    monkeypatch.setattr(collectives, "collective_device", spy)
    monkeypatch.setattr(checkpoint, "collective_device", spy)
    real_all_reduce = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.device)
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    train(config_from_dict(tiny_config(dataset, tmp_path / "run", max_steps=2, eval_every=2)))
    assert {"fastfilm.evaluate", "fastfilm.files.checkpoint"} <= set(callers)
    assert len(reduced) >= len(callers) and all(d == torch.device("cpu") for d in reduced)


@pytest.mark.parametrize("cuda, expected", [(True, "cuda:3"), (False, "cpu")])
def test_one_process_jobs_run_on_the_current_gpu_when_there_is_one(monkeypatch, cuda, expected):
    """`eval`, `analyze` and `features` share `compute_device`."""
    from fastfilm.core.devices import compute_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert compute_device() == torch.device(expected)
