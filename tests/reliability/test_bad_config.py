"""Bad configs through the command line: one clear line naming the key, exit status 2, before any work starts.

"Before any work" is checked, not assumed: joining the process group (the first costly step) is replaced by a
function that fails the test, and the run folder must not exist afterwards.
"""

import json
import os
import subprocess
import sys

import pytest

from fastfilm import train as train_mod
from fastfilm.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def good_config(dataset, run_dir) -> dict:
    return {
        "model": {"image_size": 32, "stem_num_layers": 2, "num_blocks": 2, "module_dim": 8},
        "data": {"root": str(dataset / "clevr"), "cache": str(dataset / "cache")},
        "train": {"run_dir": str(run_dir), "epochs": 1, "progress": False},
        "deepspeed": {
            "train_micro_batch_size_per_gpu": 8,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
        },
    }


def edit(cfg: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    d = cfg
    for p in parents:
        d = d.setdefault(p, {})
    if value is DELETE:
        d.pop(last, None)
    else:
        d[last] = value
    return cfg


DELETE = object()

# (case id, edits to the good config, world size, what the one line must contain)
CASES = [
    ("unknown key", [("model.modul_dim", 8)], 1, ["model", "unknown key 'modul_dim'", "module_dim"]),
    ("unknown section", [("optimiser", {})], 1, ["unknown section 'optimiser'"]),
    ("wrong type", [("train.epochs", "ten")], 1, ["train.epochs", "expected an integer"]),
    ("lr zero", [("deepspeed.optimizer.params.lr", 0)], 1, ["deepspeed.optimizer.params.lr", "> 0"]),
    ("lr negative", [("deepspeed.optimizer.params.lr", -1e-3)], 1, ["deepspeed.optimizer.params.lr"]),
    ("kernels misspelled", [("kernels.mode", "trition")], 1, ["kernels.mode", "'trition'", "triton"]),
    (
        "global batch not divisible by the ranks",
        [("deepspeed.train_micro_batch_size_per_gpu", DELETE), ("deepspeed.train_batch_size", 65)],
        2,
        ["deepspeed.train_batch_size=65", "not divisible", "2 rank(s)"],
    ),
    (
        "global batch disagrees with micro × ranks",
        [("deepspeed.train_batch_size", 24)],
        2,
        ["deepspeed.train_batch_size=24", "8", "2 rank(s) = 16"],
    ),
    (
        "batch not positive",
        [("deepspeed.train_micro_batch_size_per_gpu", 0)],
        1,
        ["train_micro_batch_size_per_gpu"],
    ),
    (
        "DeepSpeed key misspelled",
        [("deepspeed.gradient_acumulation_steps", 2)],
        1,
        ["deepspeed.gradient_acumulation_steps", "did you mean 'gradient_accumulation_steps'"],
    ),
    (
        "optimizer key fastfilm does not read",
        [("deepspeed.optimizer.params.learning_rate", 0.1)],
        1,
        ["deepspeed.optimizer.params.learning_rate", "lr, betas, eps, weight_decay"],
    ),
    (
        "ZeRO key DeepSpeed refuses",
        [("deepspeed.zero_optimization", {"stage": 1, "stgae": 2})],
        1,
        ["deepspeed.zero_optimization.stgae"],
    ),
    (
        "Adam betas",
        [("deepspeed.optimizer.params.betas", [0.9])],
        1,
        ["deepspeed.optimizer.params.betas", "two"],
    ),
    ("Adam eps", [("deepspeed.optimizer.params.eps", "x")], 1, ["deepspeed.optimizer.params.eps", ">= 0"]),
    ("gradient clipping", [("deepspeed.gradient_clipping", -1)], 1, ["deepspeed.gradient_clipping", ">= 0"]),
    ("empty run folder", [("train.run_dir", "")], 1, ["train.run_dir", "empty"]),
    (
        "pool of 0",
        [("model.classifier_downsample", "maxpool0")],
        1,
        ["model.classifier_downsample", "'maxpool0'"],
    ),
    ("pool not a size", [("model.classifier_downsample", "avgpoolx")], 1, ["model.classifier_downsample"]),
    ("negative seed", [("train.seed", -1)], 1, ["train.seed", ">= 0"]),
    ("zero collective timeout", [("train.dist_timeout_s", 0)], 1, ["train.dist_timeout_s", ">= 1"]),
    ("negative val limit", [("data.max_val_questions", -1)], 1, ["data.max_val_questions", ">= 0"]),
    ("no loader threads", [("data.num_threads", 0)], 1, ["data.num_threads", ">= 1"]),
    ("missing data cache", [("data.cache", "/nonexistent/cache")], 1, ["data.cache", "/nonexistent/cache"]),
    (
        "missing data root (png source)",
        [("data.root", "/nonexistent/clevr"), ("data.image_source", "png")],
        1,
        ["data.root", "/nonexistent/clevr"],
    ),
    ("split not prepared", [("data.val_split", "valid")], 1, ["data.val_split", "'valid'"]),
    (
        "fp16 with ZeRO",
        [("deepspeed.fp16", {"enabled": True}), ("deepspeed.zero_optimization", {"stage": 2})],
        1,
        ["deepspeed.fp16", "stage 0"],
    ),  # fmt: skip
]


@pytest.mark.parametrize("edits,world,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_before_any_work(
    dataset, tmp_path, monkeypatch, capsys, edits, world, expected
):
    run_dir = tmp_path / "run"
    cfg = good_config(dataset, run_dir)
    for path, value in edits:
        edit(cfg, path, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("WORLD_SIZE", str(world))

    def no_work(*a, **k):
        raise AssertionError("training started work before rejecting the config")

    monkeypatch.setattr(train_mod, "setup_distributed", no_work)
    assert cli(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fastfilm: config error: ") and str(path) in err[0]
    for text in expected:
        assert text in err[0], (text, err[0])
    assert not run_dir.exists()


def test_batch_larger_than_a_rank_shard_is_a_config_error(dataset, tmp_path, capsys):
    cfg = good_config(dataset, tmp_path / "run")
    cfg["deepspeed"]["train_micro_batch_size_per_gpu"] = 64  # the tiny train split has 48 questions
    path = tmp_path / "big.json"
    path.write_text(json.dumps(cfg))
    assert cli(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_micro_batch_size_per_gpu=64" in err[0] and "larger than" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_training_script_reports_the_same_line(tmp_path):
    """`python fastfilm/train.py` (what the deepspeed launcher runs) exits 2 with the one line, too."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"epochs": "ten"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "fastfilm/train.py", "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "[WARNING]" not in x]
    assert len(lines) == 1 and "train.epochs" in lines[0], proc.stderr


def test_run_folder_that_is_a_file_is_one_line_before_any_work(dataset, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(good_config(dataset, a_file)))
    monkeypatch.setattr(train_mod, "setup_distributed", lambda *a: pytest.fail("work started"))
    assert cli(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.run_dir" in err[0] and "not a folder" in err[0], err
    assert a_file.read_text() == "keep"
