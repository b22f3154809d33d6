"""The trainer on CPU: runs, checkpoints, bit-exact resume, SIGTERM, NaN stop, exact eval, export/predict, bf16."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastfilm.config import config_from_dict
from fastfilm.files import checkpoint as ckpt
from fastfilm.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(dataset, run_dir, **train_kw):
    raw = {
        "model": {
            "image_size": 32,
            "stem_num_layers": 2,
            "num_blocks": 2,
            "module_dim": 8,
            "wordvec_dim": 8,
            "rnn_hidden_dim": 16,
            "classifier_proj_dim": 16,
            "classifier_fc_dims": [16],
        },
        "data": {"root": str(dataset / "clevr"), "cache": str(dataset / "cache"), "num_threads": 1},
        "train": {
            "run_dir": str(run_dir),
            "epochs": 2,
            "patience": 0,
            "log_every": 2,
            "progress": False,
            **train_kw,
        },
        "deepspeed": {
            "train_micro_batch_size_per_gpu": 8,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 1e-5}},
            "steps_per_print": 10**9,
        },
    }
    return raw


def clean_env():
    """The environment for a child training process, without the rendezvous variables of in-process runs."""
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK"}
    return {k: v for k, v in os.environ.items() if k not in dist_vars} | {"PYTHONUNBUFFERED": "1"}


def weights(run_dir, tag="last"):
    return load_file(os.path.join(run_dir, "checkpoints", tag, "model.safetensors"))


def test_train_writes_run_folder_and_checkpoints(dataset, tmp_path):
    run = tmp_path / "run"
    summary = train(config_from_dict(tiny_config(dataset, run)))
    assert summary["epoch"] == 2 and summary["step"] == 2 * (48 // 8)
    assert 0.0 <= summary["best_val_acc"] <= 1.0
    for tag in ("last", "best"):
        ckpt.verify(str(run / "checkpoints" / tag))
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {
        "train/loss",
        "train/acc",
        "train/lr",
        "train/questions_per_s",
        "train/grad_norm",
        "val/acc",
    } <= keys
    assert os.listdir(run / "tensorboard")
    assert not [p for p in os.listdir(run / "checkpoints") if p.endswith((".partial", ".old"))]


def test_resume_is_bit_exact(dataset, tmp_path):
    # 9 steps straight vs 4 steps, stop, resume to 9 (crossing an epoch boundary at step 6 and an evaluation).
    straight = tmp_path / "straight"
    train(config_from_dict(tiny_config(dataset, straight, max_steps=9)))
    split = tmp_path / "split"
    train(config_from_dict(tiny_config(dataset, split, max_steps=4)))
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text())["step"] == 4
    train(config_from_dict(tiny_config(dataset, split, max_steps=9)), resume=True)
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    sa = json.loads((straight / "checkpoints/last/trainer_state.json").read_text())
    sb = json.loads((split / "checkpoints/last/trainer_state.json").read_text())
    assert sa == sb


def test_resume_with_another_model_or_vocabulary_is_one_line_before_any_work(
    dataset, tmp_path, capsys, monkeypatch
):
    """--resume under a config whose model section differs from the checkpoint's (a traceback of size
    mismatches after set-up), or on a cache with another vocabulary: one line, exit 2, the run untouched."""
    from fastfilm import train as train_mod
    from fastfilm.cli import main as cli
    from fastfilm.data import prep

    run = tmp_path / "run"
    train(config_from_dict(tiny_config(dataset, run, max_steps=1)))
    before = (run / "checkpoints" / "last" / "model.safetensors").read_bytes()
    other_cache = tmp_path / "cache2"
    prep.prepare(str(dataset / "clevr"), str(other_cache), image_size=32, workers=1, unk_threshold=2)
    monkeypatch.setattr(train_mod, "setup_distributed", lambda *a: pytest.fail("work started"))
    for edit, expected in (
        (("model", "module_dim", 16), "model.module_dim=8"),
        (("data", "cache", str(other_cache)), "another vocabulary"),
    ):
        raw = tiny_config(dataset, run, max_steps=2)
        raw[edit[0]][edit[1]] = edit[2]
        path = tmp_path / "c.json"
        path.write_text(json.dumps(raw))
        capsys.readouterr()
        assert cli(["train", "--config", str(path), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--resume" in err[0] and expected in err[0], err
    assert (run / "checkpoints" / "last" / "model.safetensors").read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(dataset, tmp_path):
    from fastfilm.config import ConfigError

    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train(config_from_dict(tiny_config(dataset, tmp_path / "none")), resume=True)


def test_bf16_autocast_trains_with_float32_bn_stats(dataset, tmp_path):
    raw = tiny_config(dataset, tmp_path / "bf16", max_steps=3)
    raw["deepspeed"]["bf16"] = {"enabled": True}
    train(config_from_dict(raw))
    w = weights(tmp_path / "bf16")
    assert w["net.blocks.0.bn1.running_mean"].dtype == torch.float32
    assert w["net.blocks.0.conv1.weight"].dtype == torch.float32  # master weights stay float32
    assert not torch.equal(
        w["net.blocks.0.bn1.running_var"], torch.ones_like(w["net.blocks.0.bn1.running_var"])
    )


def test_fp16_autocast_with_loss_scaling_resumes_bit_exact(dataset, tmp_path):
    def fp16(run, steps):
        raw = tiny_config(dataset, run, max_steps=steps)
        raw["deepspeed"]["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2}
        return config_from_dict(raw)

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(fp16(straight, 7))
    train(fp16(split, 3))
    train(fp16(split, 7), resume=True)
    a, b = weights(straight), weights(split)
    assert a["net.blocks.0.bn1.running_mean"].dtype == torch.float32  # BN stats and master weights float32
    assert a["net.blocks.0.conv1.weight"].dtype == torch.float32
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((straight / "checkpoints/last/trainer_state.json").read_text())
    sb = json.loads((split / "checkpoints/last/trainer_state.json").read_text())
    assert sa == sb
    # The loss scale started at 2**8 and grows every 2 overflow-free steps: the scaler really ran and was saved.
    assert sa["grad_scaler"]["growth_interval"] == 2 and sa["grad_scaler"]["scale"] > 2.0**8


def test_fp16_with_zero_or_a_static_loss_scale_is_refused(dataset, tmp_path):
    from fastfilm.config import ConfigError

    raw = tiny_config(dataset, tmp_path / "x")
    raw["deepspeed"]["fp16"] = {"enabled": True, "loss_scale": 128}
    with pytest.raises(ConfigError, match="fp16.loss_scale"):
        config_from_dict(raw)
    raw["deepspeed"]["fp16"] = {"enabled": True}
    raw["deepspeed"]["zero_optimization"] = {"stage": 1}
    with pytest.raises(ConfigError, match="zero_optimization.stage 0"):
        config_from_dict(raw)


def test_eval_count_exact_export_and_predict(dataset, tmp_path):
    from fastfilm.cli import main as cli

    run = tmp_path / "run"
    train(config_from_dict(tiny_config(dataset, run, epochs=1)))
    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", str(run), "--split", "val", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["total"] == 18  # 6 val images × 3 questions: every question once, none twice
    assert sum(f["total"] for f in result["families"].values()) == 18
    exported = tmp_path / "model"
    assert cli(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    assert sorted(os.listdir(exported)) == ["config.json", "manifest.json", "model.safetensors", "vocab.json"]
    img = dataset / "clevr" / "images" / "val" / "CLEVR_val_000000.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fastfilm", "predict", "--model", str(exported), "--image", str(img),
         "--question", "How many red cubes are there?", "--allow-unknown"],  # the tiny set may lack "cubes"
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 5
    probs = [float(r[-1]) for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


@pytest.mark.parametrize("sync_every", [1, 4])
def test_time_budget_ends_the_run_with_an_evaluation(dataset, tmp_path, sync_every):
    # The ranks agree on the budget every sync_every optimizer steps: the run stops at the first agreement.
    run = tmp_path / "budget"
    summary = train(config_from_dict(tiny_config(dataset, run, max_minutes=1e-6, sync_every=sync_every)))
    assert summary["reason"] == "train.max_minutes" and summary["step"] == sync_every
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val/acc" in x]
    assert [e["step"] for e in evals] == [sync_every] and summary["best_step"] == sync_every
    ckpt.verify(str(run / "checkpoints" / "best"))


def test_gradient_accumulation_counts_optimizer_steps_and_resumes_bit_exact(dataset, tmp_path):
    # 48 questions, micro-batch 4, accumulation 2: 12 micro-batches = 6 optimizer steps per epoch.
    def accum(run, **kw):
        raw = tiny_config(dataset, run, log_every=2, eval_every=3, **kw)
        raw["deepspeed"].update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
        return config_from_dict(raw)

    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train(accum(straight, max_steps=8))
    assert summary["step"] == 8 and summary["epoch"] == 1
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "val/acc" in r] == [3, 6]
    assert all(r["train/grad_norm"] > 0 for r in records if "train/loss" in r)  # read at the boundary
    state = json.loads((straight / "checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["questions"]) == (8, 1, 16)  # 2 steps: 4 × 4 questions

    train(accum(split, max_steps=5))
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text())["questions"] == 40
    train(accum(split, max_steps=8), resume=True)
    a, b = weights(straight), weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text()) == state
