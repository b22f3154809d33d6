"""A run folder is owned: a new run into a used folder is refused (nothing touched), a second live run is refused,
and a killed run (even by SIGKILL) leaves no lock behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fastfilm import checkpoint as ckpt

HOLD = """
import sys, time
from fastfilm import checkpoint as ckpt
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
