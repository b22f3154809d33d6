"""Two CPU ranks under the DeepSpeed launcher (gloo): ranks stay identical; a failing rank ends the job."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPSPEED = shutil.which("deepspeed", path=os.path.dirname(sys.executable))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, cfg_path, timeout):
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script, "--config", str(cfg_path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_keep_identical_parameters(dataset, tmp_path):
    run = tmp_path / "ddp"
    cfg = tmp_path / "ddp.json"
    raw = tiny_config(dataset, run, max_steps=5)
    raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 4
    cfg.write_text(json.dumps(raw))
    proc = launch("fastfilm/train.py", cfg, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    sums = summary["rank_param_checksums"]
    # Parameters are kept equal by the gradient all-reduce; BN running stats by the average before each save.
    assert len(sums["parameters"]) == 2 and sums["parameters"][0] == sums["parameters"][1], sums
    assert sums["buffers"][0] == sums["buffers"][1], sums
    assert summary["step"] == 5


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
