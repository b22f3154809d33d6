"""Two CPU ranks under the DeepSpeed launcher (gloo): ranks stay identical — with gradient accumulation and a
resume, in graph mode's static step, in channels_last — and a failing rank ends the job.

Every run the first three tests compare is trained in one launch (`two_rank_runs`, tests/reliability/train_runs.py):
one start-up of the launcher and its two ranks instead of one per run."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastfilm.config import config_from_dict
from fastfilm.model import FiLMModel
from tests.reliability.train_runs import RUN_MARK
from tests.test_graphed import assert_trained_weights_close
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


def split_runs(stdout: str, n: int) -> list[str]:
    """The launcher's output of train_runs.py cut at rank 0's RUN_MARK lines: one piece per run."""
    missing = [k for k in range(n) if RUN_MARK.format(k) not in stdout]
    assert not missing, f"no mark of run(s) {missing} in the launcher's output"
    starts = [stdout.index(RUN_MARK.format(k)) for k in range(n)] + [len(stdout)]
    return [stdout[starts[k] : starts[k + 1]] for k in range(n)]


def trained_model(raw: dict, run) -> FiLMModel:
    """The model a run's `last` checkpoint holds, in train mode."""
    vocab = json.loads((run / "checkpoints" / "last" / "vocab.json").read_text())
    model = FiLMModel(
        config_from_dict(raw).model, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"])
    )
    model.load_state_dict(weights(run))
    return model.train()


def checksums(run) -> tuple[list, list]:
    return tuple(json.loads((run / f"rank_checksums.{r}.json").read_text()) for r in (0, 1))


@pytest.fixture(scope="module")
def two_rank_runs(dataset, tmp_path_factory):
    """Every run of the tests below, trained in turn in one launch of train_runs.py --checksums (2 ranks).
    Returns (folder, {name: (raw config, the launcher's output during that run)}, the whole output)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    runs: dict[str, tuple[dict, list[str]]] = {}

    # 2 ranks × micro-batch 2 × accumulation 2: 48 questions = 6 optimizer steps per epoch; 5 steps straight, and
    # the same 5 as 3, stop, resume.
    acc = tiny_config(dataset, tmp / "ddp", max_steps=5, log_every=2, eval_every=4)
    acc["deepspeed"].update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    runs["ddp"] = (acc, [])
    for name, steps, extra in (("split3", 3, []), ("split5", 5, ["--resume"])):
        runs[name] = (dict(acc, train=dict(acc["train"], run_dir=str(tmp / "split"), max_steps=steps)), extra)

    # graph mode's static step (on a CPU: uncaptured) and DeepSpeed's engine step on the same data
    for mode in (True, False):
        raw = tiny_config(dataset, tmp / f"graphs_{mode}", max_steps=4, log_every=2, eval_every=4)
        raw["deepspeed"].update(
            train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, gradient_clipping=1.0
        )
        raw["deepspeed"]["optimizer"]["params"]["lr"] = 1e-4  # a stable run: rounding differences stay small
        raw["train"]["cuda_graphs"] = mode
        runs[f"graphs_{mode}"] = (raw, [])

    for fmt in ("channels_first", "channels_last"):
        raw = tiny_config(dataset, tmp / fmt, max_steps=3, log_every=1)
        raw["model"]["memory_format"] = fmt
        raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 4  # 2 ranks × 4: the same global batch of 8
        runs[fmt] = (raw, [])

    args: list[str] = ["--checksums"]
    for name, (raw, extra) in runs.items():
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(raw))
        args += [*(["--then"] if len(args) > 1 else []), "--config", str(path), *extra]
    proc = launch_args("tests/reliability/train_runs.py", args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = dict(zip(runs, split_runs(proc.stdout, len(runs))))
    return tmp, {name: (runs[name][0], outputs[name]) for name in runs}, proc.stdout + proc.stderr


def test_two_ranks_with_accumulation_keep_identical_parameters(two_rank_runs):
    tmp, runs, output = two_rank_runs
    run = tmp / "ddp"
    # no inference-only C++ op built (train.skip_deepspeed_shm_op)
    assert "shm_comm" not in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]  # optimizer steps, not micro-batches
    assert [r["step"] for r in records if "val/acc" in r] == [4]
    state = json.loads((run / "checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["questions"]) == (5, 40)  # 10 micro-batches × 2 questions × 2 ranks
    # Parameters are kept equal by the gradient all-reduce; BN running stats by the average before each save.
    rank0, rank1 = checksums(run)
    assert [(x["step"], x["tag"]) for x in rank0] == [(4, "last"), (4, "best"), (5, "last")]
    assert rank0 == rank1

    # The same 5 steps as 3, stop, resume: bit-identical weights and trainer state.
    split = tmp / "split"
    assert "resumed from" in runs["split5"][1] and "resumed from" not in runs["split3"][1]
    a, b = weights(run), weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text()) == state


def test_two_ranks_in_graph_mode_keep_identical_parameters_and_follow_the_engine(two_rank_runs):
    """`deepspeed --num_gpus 2` (CPU ranks, gloo) with train.cuda_graphs=true: the gradients all-reduced inside the
    static step keep the ranks' parameters identical (checksums at every save), and the run follows DeepSpeed's
    engine step on the same data within float32 rounding."""
    tmp, runs, _ = two_rank_runs
    models = {}
    for mode in (True, False):
        raw, out = runs[f"graphs_{mode}"]
        assert ("graph mode's static-shape step runs eagerly" in out) == mode
        rank0, rank1 = checksums(tmp / f"graphs_{mode}")
        assert rank0 == rank1 and {x["step"] for x in rank0} == {4}
        models[mode] = trained_model(raw, tmp / f"graphs_{mode}")
    assert_trained_weights_close(models[False], models[True], steps=4, lr=1e-4)


def test_channels_last_trains_under_the_launcher_with_channels_firsts_logits(two_rank_runs):
    """model.memory_format=channels_last trains under the real DeepSpeed launcher and gives channels_first's logits
    within float32 rounding. DeepSpeed's parameter broadcast in `deepspeed.initialize` refuses channels_last
    parameters ("self.stride(-1) must be 1 to view Float as Byte"): the trainer converts the model after it."""
    tmp, runs, _ = two_rank_runs
    models, losses = {}, {}
    for fmt in ("channels_first", "channels_last"):
        rows = [json.loads(x) for x in (tmp / fmt / "metrics.jsonl").read_text().splitlines()]
        losses[fmt] = [r["train/loss"] for r in rows if "train/loss" in r]
        models[fmt] = trained_model(runs[fmt][0], tmp / fmt)
    assert len(losses["channels_last"]) == 3
    torch.testing.assert_close(losses["channels_last"], losses["channels_first"], rtol=1e-5, atol=1e-6)
    assert_trained_weights_close(models["channels_first"], models["channels_last"], steps=3, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g)
    questions = torch.randint(4, 8, (6, 7), generator=g)
    lengths = torch.tensor([7, 5, 3, 7, 2, 6])
    cl = models["channels_last"].to(memory_format=torch.channels_last)
    cl.cfg.memory_format = "channels_last"
    torch.testing.assert_close(
        cl(images, questions, lengths),
        models["channels_first"](images, questions, lengths),
        rtol=1e-4,
        atol=1e-5,
    )


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
