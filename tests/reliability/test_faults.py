"""Faults during training: full disk, kills between checkpoint writes (simulated and real SIGKILL), odd questions.

After each, the previous checkpoint stays loadable and a resume goes on correctly.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastfilm.config import config_from_dict
from fastfilm.files import checkpoint as ckpt
from fastfilm.train import TrainingStopped, train
from tests.test_train import ROOT, clean_env, tiny_config, weights


def state(run, tag="last"):
    folder = ckpt.resolve_tag_dir(str(run / "checkpoints"), tag)
    assert folder is not None, f"no loadable '{tag}' in {run}"
    ckpt.verify(folder)
    return json.loads(open(os.path.join(folder, "trainer_state.json")).read())


def test_disk_full_while_checkpointing_keeps_the_previous_one(dataset, tmp_path, monkeypatch):
    run = tmp_path / "full"
    cfg = tiny_config(dataset, run, epochs=3)
    real = ckpt.atomic_save_safetensors
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        if path.endswith("model.safetensors"):
            calls["n"] += 1
            if calls["n"] == 3:  # epoch 1 wrote last+best; the disk fills during epoch 2's `last`
                raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "atomic_save_safetensors", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous one is kept"):
        train(config_from_dict(cfg))
    assert state(run)["step"] == 6
    assert not (run / "checkpoints" / "last.partial").exists()
    monkeypatch.setattr(ckpt, "atomic_save_safetensors", real)
    summary = train(config_from_dict(cfg), resume=True)  # the disk has space again
    assert summary["step"] == 18 and state(run)["step"] == 18


@pytest.mark.parametrize("window", ["deepspeed_write", "between_renames"])
def test_kill_inside_a_checkpoint_save_keeps_a_loadable_one(dataset, tmp_path, monkeypatch, window):
    run = tmp_path / window
    cfg = tiny_config(dataset, run, epochs=2)
    train(config_from_dict(dict(cfg, train=dict(cfg["train"], epochs=1))))  # a good `last` at step 6
    before = weights(run)

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs (no except/finally in fastfilm catches BaseException)."""

    if window == "deepspeed_write":
        from deepspeed.runtime.engine import DeepSpeedEngine

        def killed(self, *a, **k):
            raise Killed

        monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", killed)
    else:
        real_replace = os.replace

        def replace(src, dst):
            if src.endswith("/last.partial"):
                raise Killed  # `last` was already renamed to `last.old`; the new one not yet into place
            return real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(Killed):
        train(config_from_dict(cfg), resume=True)
    monkeypatch.undo()
    assert state(run)["step"] == 6  # `last` (or `last.old`) from before the kill
    folder = ckpt.resolve_tag_dir(str(run / "checkpoints"), "last")
    from safetensors.torch import load_file

    kept = load_file(os.path.join(folder, "model.safetensors"))
    assert all(torch.equal(kept[k], before[k]) for k in before)
    summary = train(config_from_dict(cfg), resume=True)
    assert summary["step"] == 12 and state(run)["step"] == 12


def test_real_sigkill_during_training_leaves_a_loadable_checkpoint(dataset, tmp_path):
    # Checkpoints every step, so the kills land inside saves as often as between them.
    run = tmp_path / "kill"
    cfg_path = tmp_path / "kill.json"
    raw = tiny_config(dataset, run, epochs=1000, eval_every=1)
    cfg_path.write_text(json.dumps(raw))
    for attempt, delay in enumerate((0.0, 0.7, 1.3)):
        cmd = [sys.executable, "fastfilm/train.py", "--config", str(cfg_path)] + (
            ["--resume"] if attempt else []
        )
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.time() + 300
        start_step = state(run)["step"] if attempt else 0
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            folder = ckpt.resolve_tag_dir(str(run / "checkpoints"), "last")
            if (
                folder
                and json.loads(open(os.path.join(folder, "trainer_state.json")).read())["step"] > start_step
            ):
                break
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert state(run)["step"] > start_step  # loadable, verified, and further than before
    proc = subprocess.run(
        [sys.executable, "fastfilm/train.py", "--config", str(cfg_path), "--resume", "--set", "train.max_steps=0",
         "--set", "train.epochs=" + str(state(run)["epoch"] + 1)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout


def test_odd_questions_through_the_model(dataset):
    from fastfilm.data import load_vocab
    from fastfilm.data.tokenize import encode_question
    from fastfilm.model import FiLMModel

    vocab = load_vocab(str(dataset / "cache"))
    only_unknown = encode_question("zebra giraffe okapi", vocab)
    assert only_unknown == [1, 3, 3, 3, 2]
    longest = max(len(q) for q in [encode_question("How many red cubes are there?", vocab)])
    very_long = encode_question(" ".join(["red"] * 200) + "?", vocab)
    assert len(very_long) > 10 * longest
    cfg = config_from_dict(tiny_config(dataset, "unused")).model
    m = FiLMModel(cfg, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"])).eval()
    q = torch.zeros(2, len(very_long), dtype=torch.long)
    q[0, : len(only_unknown)] = torch.tensor(only_unknown)
    q[1] = torch.tensor(very_long)
    with torch.no_grad():
        out = m(torch.rand(2, 3, 32, 32), q)
    assert out.shape == (2, len(vocab["answer_token_to_idx"])) and torch.isfinite(out).all()


SIGTERM_STEPS = 100


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    """The uninterrupted run both SIGTERM cases end equal to (trained once for the two)."""
    straight = tmp_path_factory.mktemp("straight")
    train(config_from_dict(tiny_config(dataset, straight, epochs=1000, max_steps=SIGTERM_STEPS)))
    return straight


@pytest.mark.parametrize(
    "delay", [0.0, random.Random(os.getpid()).uniform(0.05, 0.6)], ids=["early", "random"]
)
def test_sigterm_at_any_step_saves_and_resume_continues_exactly(dataset, tmp_path, delay, straight_run):
    """SIGTERM finishes the step, saves `last`, exits 0; a resume then ends bit-identical to an uninterrupted run.
    The ranks agree on a signal every train.sync_every (10) steps: the run is long enough for that to come first."""
    steps, straight = SIGTERM_STEPS, straight_run

    run, cfg = tmp_path / "sig", tmp_path / "sig.json"
    cfg.write_text(json.dumps(tiny_config(dataset, run, epochs=1000, max_steps=steps)))
    proc = subprocess.Popen(
        [sys.executable, "fastfilm/train.py", "--config", str(cfg)],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline, metrics = time.time() + 300, run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = state(run)["step"]
    assert "signal SIGTERM" in out and 2 <= stopped < steps, (stopped, out[-2000:])

    train(config_from_dict(tiny_config(dataset, run, epochs=1000, max_steps=steps)), resume=True)
    assert state(run)["step"] == steps
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), f"resume after SIGTERM at step {stopped} diverged"


def test_nan_batch_stops_keeps_the_last_good_checkpoint_and_resume_continues(dataset, tmp_path, monkeypatch):
    import fastfilm.data as data
    import fastfilm.data.loader  # noqa: F401  (the module loader_for looks build_loader up in)

    real = data.build_loader
    poison = {"on": True}

    class Poisoned:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def epoch(self, epoch, *args, **kwargs):
            for i, b in enumerate(self.loader.epoch(epoch, *args, **kwargs)):
                if poison["on"] and epoch == 1 and i == 2:
                    b = dict(b, image=torch.full_like(b["image"], float("nan")))
                yield b

    def build(cache, split, *a, **k):
        loader = real(cache, split, *a, **k)
        return Poisoned(loader) if split == "train" else loader

    monkeypatch.setattr(data.loader, "build_loader", build)  # what the trainer's loader_for calls
    run = tmp_path / "nan"
    with pytest.raises(TrainingStopped, match="non-finite loss.*last good checkpoint"):
        train(config_from_dict(tiny_config(dataset, run, epochs=3)))
    assert state(run)["step"] == 6  # the epoch-1 checkpoint, verified
    good = weights(run)
    assert all(torch.isfinite(t).all() for t in good.values() if t.is_floating_point())

    poison["on"] = False  # the bad batch is fixed: resume from the kept checkpoint and finish
    summary = train(config_from_dict(tiny_config(dataset, run, epochs=3)), resume=True)
    assert summary["step"] == 18 and state(run)["step"] == 18
    assert all(torch.isfinite(t).all() for t in weights(run).values() if t.is_floating_point())
