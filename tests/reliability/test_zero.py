"""DeepSpeed ZeRO end to end on 2 CPU ranks, and resume on another number of ranks or micro-batch.

One launch of `zero_runs.py` (2 ranks) trains every run compared here: per case (stage 0, 1, 2 in float32, stage 0
and 2 in bf16) 9 steps straight (bf16: 5), and 4 steps + `--resume` to 9 (bf16: 2 + resume to 5). Then, in this
process:
- per case, straight and resumed are bit-identical: parameters and BN buffers, the optimizer state of every rank,
  the trainer state;
- the exported ZeRO models hold every parameter with the model's shape and are bit-identical to the stage-0 run of
  the same precision (weights, BN statistics and logits);
  `fastfilm eval` counts every question once;
- the stage-0 run stopped mid-epoch on 2 ranks, resumed here on 1 rank (micro-batch 8, and 4), trains on every
  question of that epoch exactly once (by the loader's question indices), and says what it resumed into;
- a ZeRO checkpoint is refused on another number of ranks, in one line.
"""

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastfilm.cli import main as cli
from fastfilm.config import config_from_dict
from fastfilm.data.loader import Loader
from fastfilm.files import checkpoint as ckpt
from fastfilm.train import train
from tests.reliability.test_distributed import launch_args
from tests.test_train import tiny_config

CASES = ("stage0", "stage1", "stage2", "stage0_bf16", "stage2_bf16")
QUESTIONS = 48  # the `dataset` fixture's train split; 2 ranks × micro-batch 8 = 3 steps per epoch
VAL_QUESTIONS = 18


def base_config(dataset, run_dir, **train_kw):
    raw = tiny_config(dataset, run_dir, epochs=5, **train_kw)
    raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 8
    return raw


@pytest.fixture(scope="module")
def zero_runs(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    cfg = out / "base.json"
    cfg.write_text(json.dumps(base_config(dataset, out / "unused")))
    proc = launch_args("tests/reliability/zero_runs.py", [cfg, out], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def optimizer_states(folder):
    """Every tensor (and plain value) of every rank's optimizer state, flattened to {path: value}."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}/{i}", x)
        elif isinstance(v, torch.Tensor):
            out[prefix] = v
        elif isinstance(v, (int, float, str, bool, type(None))):
            out[prefix] = v
        else:
            out[prefix] = repr(v)

    files = sorted(glob.glob(os.path.join(folder, "*optim_states.pt")))
    files = files or [
        os.path.join(folder, "mp_rank_00_model_states.pt")
    ]  # stage 0: the optimizer is in there
    with torch.serialization.safe_globals(ckpt.deepspeed_safe_globals()):
        for f in files:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            sd = sd.get("optimizer_state_dict", sd.get("optimizer"))
            walk(os.path.basename(f), sd)
    return out


def record_training_indices(monkeypatch) -> list:
    """The (epoch, question indices) of every training batch the loader yields from now on."""
    seen = []
    real = Loader.epoch

    def recording(self, epoch, start_batch=0, start_question=0):
        for batch in real(self, epoch, start_batch, start_question):
            if self.drop_last:
                seen.append((epoch, batch["index"].tolist()))
            yield batch

    monkeypatch.setattr(Loader, "epoch", recording)
    return seen


def test_straight_and_resumed_runs_are_bit_identical_for_every_stage(zero_runs):
    out, stdout = zero_runs
    for case in CASES:
        a, b = out / f"{case}_straight/checkpoints/last", out / f"{case}_split/checkpoints/last"
        sa = json.loads((a / "trainer_state.json").read_text())
        sb = json.loads((b / "trainer_state.json").read_text())
        assert sa == sb and sa["step"] == (5 if "bf16" in case else 9), case
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], case
        oa, ob = optimizer_states(str(a)), optimizer_states(str(b))
        assert oa.keys() == ob.keys() and any(isinstance(v, torch.Tensor) and v.numel() for v in oa.values())
        differ = [
            k
            for k in oa
            if not (torch.equal(oa[k], ob[k]) if isinstance(oa[k], torch.Tensor) else oa[k] == ob[k])
        ]
        assert differ == [], (case, differ[:5])
        layout = json.loads((a / "layout.json").read_text())
        stage = int(case[5])
        assert layout == {
            "world_size": 2,
            "micro_batch": 8,
            "gradient_accumulation_steps": 1,
            "global_batch": 16,
            "zero_stage": stage,
        }
        n_optim = len(glob.glob(str(a / "zero_pp_rank_*_optim_states.pt")))
        assert n_optim == (2 if stage else 0), case  # ZeRO really partitioned the optimizer state
    assert stdout.count("resumed from") == len(CASES)


def test_exported_zero_models_are_whole_and_match_the_run_without_zero(zero_runs, tmp_path, capsys):
    from fastfilm.data import loader_for
    from fastfilm.files.export import load_model_folder
    from fastfilm.model import FiLMModel

    out, _ = zero_runs
    models = {}
    for case in CASES:
        assert cli(["export", "--checkpoint", str(out / f"{case}_straight"), "--tag", "last", "--out", str(tmp_path / case)]) == 0  # fmt: skip
        model, cfg, vocab = load_model_folder(str(tmp_path / case))
        fresh = FiLMModel(cfg.model, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]))
        shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        weights = load_file(str(tmp_path / case / "model.safetensors"))
        assert {k: tuple(v.shape) for k, v in weights.items()} == shapes, case
        assert all(v.numel() for v in weights.values() if v.dim()), case
        models[case] = model.eval()
        report = tmp_path / f"{case}.json"
        assert cli(["eval", "--checkpoint", str(out / f"{case}_straight"), "--tag", "last", "--json", str(report)]) == 0  # fmt: skip
        result = json.loads(report.read_text())
        assert result["total"] == VAL_QUESTIONS
        assert sum(f["total"] for f in result["families"].values()) == VAL_QUESTIONS
    batch = next(iter(loader_for(cfg, "val", train=False, batch_size=VAL_QUESTIONS).epoch(0)))
    with torch.no_grad():
        logits = {c: m(batch["image"], batch["question"], batch["length"]) for c, m in models.items()}
    # ZeRO 1 and 2 run the same arithmetic as stage 0 here (a sum of 2 ranks' gradients, then the same
    # elementwise Adam on each element): the exports are bit-identical, so are their logits.
    for case, ref in (("stage1", "stage0"), ("stage2", "stage0"), ("stage2_bf16", "stage0_bf16")):
        diff = (logits[case] - logits[ref]).abs().max().item()
        assert torch.equal(logits[case], logits[ref]), f"{case}: logits differ from {ref} by up to {diff:.3g}"
        w, w_ref = (load_file(str(tmp_path / c / "model.safetensors")) for c in (case, ref))
        assert [k for k in w_ref if not torch.equal(w[k], w_ref[k])] == [], case


def recorded_epochs(paths):
    seen = {}
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            seen.setdefault(r["epoch"], []).extend(r["index"])
    return seen


@pytest.mark.parametrize("micro", [8, 4], ids=["1rank", "1rank-half-micro-batch"])
def test_two_rank_run_resumed_on_one_rank_sees_each_question_of_the_epoch_once(
    dataset, zero_runs, tmp_path, monkeypatch, capsys, micro
):
    out, _ = zero_runs
    # The 2-rank stage-0 run stopped after 4 steps: 3 steps = epoch 0, then 1 step (16 questions) of epoch 1;
    # resumed here on 1 rank it trains the rest of epoch 1 (epochs=2).
    before = recorded_epochs(sorted(glob.glob(str(out / "indices_rank*.jsonl"))))
    assert sorted(before[0]) == list(range(QUESTIONS)) and len(before[1]) == 16
    run = tmp_path / "run"
    shutil.copytree(out / "stage0_mid", run, ignore=shutil.ignore_patterns(".lock"))
    seen = record_training_indices(monkeypatch)
    raw = base_config(dataset, run, max_steps=0)
    raw["train"]["epochs"] = 2
    raw["deepspeed"]["train_micro_batch_size_per_gpu"] = micro
    summary = train(config_from_dict(raw), resume=True)
    assert summary["epoch"] == 2
    after = [i for e, idx in seen if e == 1 for i in idx]
    assert all(e == 1 for e, _ in seen)
    assert sorted(before[1] + after) == list(range(QUESTIONS)), "a question repeated or skipped"
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("resume:"))
    assert "2 rank(s) × micro-batch 8 (global batch 16)" in line
    assert f"1 rank(s) × micro-batch {micro} × accumulation 1 = global batch {micro}, lr 0.001" in line
    assert f"after 16 of its {QUESTIONS} questions: {32 // micro} step(s)" in line


def test_zero_checkpoint_on_another_number_of_ranks_is_refused(dataset, zero_runs, tmp_path):
    out, _ = zero_runs
    run = tmp_path / "run"
    shutil.copytree(out / "stage1_split", run, ignore=shutil.ignore_patterns(".lock"))
    raw = base_config(dataset, run, max_steps=12)
    raw["deepspeed"]["zero_optimization"] = {"stage": 1}
    with pytest.raises(
        ckpt.CheckpointError, match=r"written by 2 rank\(s\) under ZeRO stage 1.*resume it on 2"
    ):
        train(config_from_dict(raw), resume=True)
    with ckpt.claim_run_dir(str(run), resume=True):  # the refused resume released the run folder
        pass


@pytest.mark.parametrize("stage,bucketed", [(1, False), (0, True)], ids=["zero1", "stage0-bucket_by_length"])
def test_resume_with_another_micro_batch_on_the_same_ranks(dataset, tmp_path, monkeypatch, stage, bucketed):
    seen = record_training_indices(monkeypatch)
    run = tmp_path / "run"
    raw = base_config(dataset, run, max_steps=2)  # 1 rank × 8: 6 steps per epoch; stop after 16 questions
    raw["train"]["epochs"] = 1
    raw["deepspeed"]["zero_optimization"] = {"stage": stage}
    raw["data"]["bucket_by_length"] = bucketed  # its epoch order depends on the global batch it was drawn for
    train(config_from_dict(raw))
    raw["train"]["max_steps"] = 0
    raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 4  # 32 questions left: 8 steps
    summary = train(config_from_dict(raw), resume=True)
    assert summary["step"] == 10 and summary["epoch"] == 1
    assert sorted(i for _, idx in seen for i in idx) == list(range(QUESTIONS))
