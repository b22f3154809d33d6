"""A run folder is owned: a new run into a used folder is refused (nothing touched), a second live run is refused,
and a killed run (even by SIGKILL) leaves no lock behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fastfilm.files import checkpoint as ckpt

HOLD = """
import sys, time
from fastfilm.files import checkpoint as ckpt
lock = ckpt.claim_run_dir(sys.argv[1], resume=True)
print("held", flush=True)
time.sleep(600)
"""


def snapshot(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            if n != ".lock":
                out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def used_run(run):
    folder = run / "checkpoints" / "last"
    folder.mkdir(parents=True)
    ckpt.atomic_write_json(str(folder / "trainer_state.json"), {"step": 60})
    ckpt.write_manifest(str(folder))
    (run / "metrics.jsonl").write_text('{"step": 60}\n')
    (run / "notes.txt").write_text("mine")
    return run


def test_new_run_into_a_used_folder_is_refused_and_nothing_changes(tmp_path):
    run = used_run(tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.claim_run_dir(str(run))
    msg = str(e.value)
    assert "\n" not in msg and "holds a run (checkpoint last at step 60)" in msg
    assert "--resume" in msg and "--overwrite" in msg and "train.run_dir" in msg
    assert snapshot(run) == before
    with ckpt.claim_run_dir(str(run), resume=True):  # the refusal left no lock held
        pass
    with pytest.raises(ckpt.CheckpointError, match="exclude each other"):
        ckpt.claim_run_dir(str(run), resume=True, overwrite=True)
    assert snapshot(run) == before


def test_overwrite_deletes_the_old_run_only(tmp_path):
    run = used_run(tmp_path / "run")
    with ckpt.claim_run_dir(str(run), overwrite=True):
        assert sorted(os.listdir(run)) == [".lock", "notes.txt"]
    with ckpt.claim_run_dir(str(run)):  # now a new run may start there
        pass


def test_empty_or_new_folder_and_other_ranks(tmp_path):
    with ckpt.claim_run_dir(str(tmp_path / "new" / "run")) as lock:
        assert lock.fd is not None
        other = ckpt.claim_run_dir(str(tmp_path / "new" / "run"), rank=1)  # ranks > 0 never lock
        assert other.fd is None
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")  # a run that died before logging anything
    with ckpt.claim_run_dir(str(tmp_path / "cfgonly")):
        pass


def test_a_live_run_holds_the_folder_and_a_sigkilled_one_does_not(tmp_path):
    run = used_run(tmp_path / "run")
    env = dict(
        os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.claim_run_dir(str(run), resume=True)
        assert f"in use by a live run (pid {holder.pid} on " in str(e.value)
        assert "another train.run_dir" in str(e.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.time() + 10
        with ckpt.claim_run_dir(str(run), resume=True) as lock:  # the kernel dropped the dead run's lock
            assert time.time() < deadline
            assert open(run / ".lock").read().startswith(f"pid {os.getpid()} ")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert lock.fd is None


# ------------------------------------------------------------------------------ the trainer and its commands
def trainer_cmd(*args):
    return [sys.executable, "fastfilm/train.py", *args]


def test_a_new_training_run_into_a_used_folder_is_refused_and_overwrite_starts_afresh(dataset, tmp_path):
    import json

    from fastfilm.config import config_from_dict
    from fastfilm.train import train
    from tests.test_train import ROOT, clean_env, tiny_config

    run, cfg = tmp_path / "run", tmp_path / "cfg.json"
    raw = tiny_config(dataset, run, max_steps=4)
    cfg.write_text(json.dumps(raw))
    train(config_from_dict(raw))
    before = snapshot(run)
    with pytest.raises(ckpt.CheckpointError, match="holds a run.*--resume.*--overwrite"):
        train(config_from_dict(dict(raw, train=dict(raw["train"], max_steps=1))))
    proc = subprocess.run(
        [sys.executable, "-m", "fastfilm", "train", "--config", str(cfg), "--set", "train.max_steps=1"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfilm: checkpoint error: ") and "--resume" in lines[0]
    assert snapshot(run) == before  # the 4-step run's checkpoints and metrics, byte for byte
    proc = subprocess.run(
        trainer_cmd("--config", str(cfg), "--set", "train.max_steps=2", "--overwrite"),
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((run / "checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == 2 and not (run / "checkpoints/best").exists()  # the old run's `best` is gone too
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2]


def test_a_second_live_training_run_is_refused_and_a_sigkilled_one_does_not_block_resume(dataset, tmp_path):
    import json

    from tests.test_train import ROOT, clean_env, tiny_config

    run, cfg = tmp_path / "run", tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_config(dataset, run, epochs=1000, eval_every=1)))
    first = subprocess.Popen(
        trainer_cmd("--config", str(cfg)), cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not ckpt.resolve_tag_dir(str(run / "checkpoints"), "last"):
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        before = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        second = subprocess.run(
            trainer_cmd("--config", str(cfg), "--resume"),
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"in use by a live run (pid {first.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the live run went on, untouched
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    step = json.loads(open(os.path.join(ckpt.resolve_tag_dir(str(run / "checkpoints"), "last"), "trainer_state.json")).read())["step"]  # fmt: skip
    third = subprocess.run(
        trainer_cmd("--config", str(cfg), "--resume", "--set", f"train.max_steps={step + 1}"),
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed from" in third.stdout and f'"step": {step + 1}' in third.stdout
