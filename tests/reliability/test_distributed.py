"""Two CPU ranks under the DeepSpeed launcher (gloo): ranks stay identical; a failing rank ends the job."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import torch

from tests.test_train import tiny_config, weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPSPEED = shutil.which("deepspeed", path=os.path.dirname(sys.executable))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, cfg_path, timeout, extra=()):
    return launch_args(script, ["--config", str(cfg_path), *extra], timeout)


def launch_args(script, args, timeout):
    """`deepspeed --num_gpus 2 SCRIPT ARGS` on 2 CPU ranks, on a free port, with this venv first on PATH."""
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_with_accumulation_keep_identical_parameters(dataset, tmp_path):
    # 2 ranks × micro-batch 2 × accumulation 2: 48 questions = 6 optimizer steps per epoch.
    run = tmp_path / "ddp"
    cfg = tmp_path / "ddp.json"
    raw = tiny_config(dataset, run, max_steps=5, log_every=2, eval_every=4)
    raw["deepspeed"].update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    cfg.write_text(json.dumps(raw))
    proc = launch("tests/reliability/rank_checksums.py", cfg, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # no inference-only C++ op built (train.skip_deepspeed_shm_op)
    assert "shm_comm" not in proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]  # optimizer steps, not micro-batches
    assert [r["step"] for r in records if "val/acc" in r] == [4]
    state = json.loads((run / "checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["questions"]) == (5, 40)  # 10 micro-batches × 2 questions × 2 ranks
    # Parameters are kept equal by the gradient all-reduce; BN running stats by the average before each save.
    rank0, rank1 = (json.loads((run / f"rank_checksums.{r}.json").read_text()) for r in (0, 1))
    assert [(x["step"], x["tag"]) for x in rank0] == [(4, "last"), (4, "best"), (5, "last")]
    assert rank0 == rank1

    # The same 5 steps as 3, stop, resume: bit-identical weights and trainer state.
    split = tmp_path / "split"
    for steps, extra in ((3, []), (5, ["--resume"])):
        raw = dict(raw, train=dict(raw["train"], run_dir=str(split), max_steps=steps))
        cfg.write_text(json.dumps(raw))
        proc = launch("fastfilm/train.py", cfg, timeout=600, extra=extra)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = weights(run), weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text()) == state


def test_failing_rank_takes_the_job_down(dataset, tmp_path):
    run = tmp_path / "fail"
    cfg = tmp_path / "fail.json"
    raw = tiny_config(dataset, run, epochs=50, dist_timeout_s=60)
    raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 4
    cfg.write_text(json.dumps(raw))
    t0 = time.time()
    proc = launch("tests/reliability/fail_rank.py", cfg, timeout=400)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert time.time() - t0 < 300  # ended by the launcher / the collective timeout, not hung
