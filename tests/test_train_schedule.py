"""The trainer with a DeepSpeed `scheduler`, gradient clipping and ZeRO on one rank: the logged learning rate is
the one each optimizer step applied, a resume is bit-exact and says the rate it continues with, the logged grad
norm is the pre-clip norm at every stage. And `--resume` of a run that had reached `max_steps` or stopped early
takes no further step."""

import json

import pytest
import torch

import fastfilm.train as train_mod
from fastfilm.config import config_from_dict
from fastfilm.train import train
from tests.test_train import tiny_config, weights


def records(run, key):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture
def applied_lrs(monkeypatch):
    """The learning rate of every optimizer step the trainer's optimizer takes (read as the step runs)."""
    seen = []
    real = train_mod.build_optimizer

    def watched(model, ds):
        opt = real(model, ds)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(train_mod, "build_optimizer", watched)
    return seen


def warmup(dataset, run, stage=0, **kw):
    # 48 questions, micro-batch 4, accumulation 2: 6 optimizer steps per epoch; linear warm-up over 5 steps.
    raw = tiny_config(dataset, run, log_every=1, eval_every=3, **kw)
    raw["deepspeed"].update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    raw["deepspeed"]["zero_optimization"] = {"stage": stage}
    raw["deepspeed"]["scheduler"] = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 1e-4,
            "warmup_max_lr": 1e-3,
            "warmup_num_steps": 5,
            "warmup_type": "linear",
        },
    }
    return config_from_dict(raw)


@pytest.mark.parametrize("stage", [0, 2])
def test_scheduler_is_stepped_per_optimizer_step_logged_as_applied_and_resumed_exactly(
    dataset, tmp_path, applied_lrs, capsys, stage
):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(warmup(dataset, straight, stage, max_steps=8))
    lrs = records(straight, "train/lr")
    assert [s for s, _ in lrs] == list(range(1, 9))
    # One scheduler step per optimizer step (not per micro-batch): 8 rates, the warm-up's, as applied.
    assert [lr for _, lr in lrs] == applied_lrs, (lrs, applied_lrs)
    assert len(set(applied_lrs)) > 3 and max(applied_lrs) == pytest.approx(1e-3)

    applied_lrs.clear()
    train(warmup(dataset, split, stage, max_steps=4))
    capsys.readouterr()
    train(warmup(dataset, split, stage, max_steps=8), resume=True)
    resumed_line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("resume:")]
    assert records(split, "train/lr") == lrs and applied_lrs == [lr for _, lr in lrs]
    a, b = weights(straight), weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # The line names the rate the resumed run continues with (step 5's), not the optimizer section's.
    assert len(resumed_line) == 1 and f"lr {lrs[4][1]:g}" in resumed_line[0], (resumed_line, lrs)


@pytest.mark.parametrize("stage", [1, 2])
def test_grad_norm_with_clipping_is_the_pre_clip_norm_at_every_zero_stage(dataset, tmp_path, stage):
    def clipped(run, zero):
        raw = tiny_config(dataset, run, log_every=1, max_steps=3)
        raw["deepspeed"].update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
        raw["deepspeed"]["gradient_clipping"] = 1e-3  # far below the norm: every step is clipped
        raw["deepspeed"]["zero_optimization"] = {"stage": zero}
        return config_from_dict(raw)

    train(clipped(tmp_path / "z0", 0))
    train(clipped(tmp_path / "zn", stage))
    n0, nn = records(tmp_path / "z0", "train/grad_norm"), records(tmp_path / "zn", "train/grad_norm")
    assert [s for s, _ in n0] == [1, 2, 3] and all(v > 1e-2 for _, v in n0), n0  # pre-clip: above the clip
    assert [s for s, _ in nn] == [1, 2, 3]
    for (_, a), (_, b) in zip(n0, nn):
        assert b == pytest.approx(a, rel=1e-4), (n0, nn)


def test_resume_of_a_run_that_reached_max_steps_takes_no_step(dataset, tmp_path):
    run = tmp_path / "run"
    train(config_from_dict(tiny_config(dataset, run, max_steps=3)))
    before = weights(run)
    summary = train(config_from_dict(tiny_config(dataset, run, max_steps=3)), resume=True)
    assert summary["step"] == 3 and summary["reason"] == "train.max_steps"
    after = weights(run)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert json.loads((run / "checkpoints/last/trainer_state.json").read_text())["step"] == 3


def test_resume_of_an_early_stopped_run_takes_no_step(dataset, tmp_path):
    run = tmp_path / "run"
    # Evaluating every step with patience 1, a run stops at the first evaluation that is not better.
    straight = train(config_from_dict(tiny_config(dataset, run, epochs=4, eval_every=1, patience=1)))
    assert straight["reason"].startswith("early stopping"), straight
    before = weights(run)
    again = train(
        config_from_dict(tiny_config(dataset, run, epochs=4, eval_every=1, patience=1)), resume=True
    )
    assert again["reason"] == straight["reason"] and again["step"] == straight["step"], (straight, again)
    after = weights(run)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_accumulation_that_does_not_divide_the_epoch_drops_its_tail_and_resumes_exactly(
    dataset, tmp_path, monkeypatch
):
    """48 questions, micro-batch 4, accumulation 5: 12 micro-batches, 2 optimizer steps (40 questions) per epoch;
    the last 2 micro-batches of every epoch are not trained on and no partial accumulation leaks into the next
    epoch. With dropout, a run stopped mid-epoch 2 and resumed is bit-identical to one run straight through;
    another train.seed draws another order."""
    from fastfilm.data.loader import Loader

    seen = []
    real = Loader.epoch

    def recording(self, epoch, start_batch=0, start_question=0):
        for batch in real(self, epoch, start_batch, start_question):
            if self.drop_last:  # training batches only
                seen.append((epoch, batch["index"].tolist()))
            yield batch

    monkeypatch.setattr(Loader, "epoch", recording)

    def accum(run, **kw):
        raw = tiny_config(dataset, run, epochs=3, log_every=1, **kw)
        raw["model"].update(classifier_dropout=0.3)
        raw["deepspeed"].update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=5)
        return config_from_dict(raw)

    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train(accum(straight))
    assert (summary["step"], summary["epoch"]) == (6, 3)
    order = Loader(str(dataset / "cache"), "train", 4, image_size=32, shuffle=True, seed=0, drop_last=True)
    for e in range(3):
        trained = [i for ep, idx in seen if ep == e for i in idx]
        assert trained == order.order(e)[:40].tolist(), e  # whole steps only, in the epoch's order
    straight_seen = list(seen)
    seen.clear()
    train(accum(split, max_steps=3))
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text())["questions"] == 20
    train(accum(split), resume=True)
    assert seen == straight_seen
    a, b = weights(straight), weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert records(split, "train/loss") == records(straight, "train/loss")
    seen.clear()
    train(accum(tmp_path / "seed1", max_steps=1, seed=1))
    assert [i for _, idx in seen for i in idx] != [i for _, idx in straight_seen[:5] for i in idx]


def test_max_val_questions_is_the_first_n_questions_on_any_number_of_ranks(dataset, tmp_path):
    """`data.max_val_questions: 10` scores exactly the split's first 10 questions: not a whole batch more (16 at
    micro-batch 8 on one rank), and not 10 per rank; the shards of 3 ranks together score the same 10 questions
    (the same hits, family by family) as one rank."""
    from fastfilm.data import load_vocab
    from fastfilm.data.loader import loader_for
    from fastfilm.evaluate import evaluate
    from fastfilm.model import FiLMModel

    cfg = config_from_dict(tiny_config(dataset, tmp_path / "unused"))
    vocab = load_vocab(cfg.data.cache)
    torch.manual_seed(0)
    model = FiLMModel(cfg.model, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]))
    cpu = torch.device("cpu")

    def score(shard, shards, limit):
        loader = loader_for(
            cfg, "val", train=False, device=cpu, shard_id=shard, num_shards=shards, vocab=vocab
        )
        return evaluate(
            model, loader, cpu, family_names=vocab.get("question_family_names"), max_questions=limit
        )

    whole = score(0, 1, 0)
    one = score(0, 1, 10)
    assert (whole["total"], one["total"]) == (18, 10)
    parts = [score(s, 3, 10) for s in range(3)]
    assert sum(p["total"] for p in parts) == 10 and sum(p["correct"] for p in parts) == one["correct"]
    for name, row in one["families"].items():
        assert sum(p["families"].get(name, {"total": 0})["total"] for p in parts) == row["total"], name
        assert sum(p["families"].get(name, {"correct": 0})["correct"] for p in parts) == row["correct"], name
    assert score(0, 1, 100)["total"] == 18  # a limit above the split is the whole split


def test_early_stopping_across_a_resume_stops_at_the_straight_runs_step(dataset, tmp_path):
    """best_acc and evals_since_best travel in the checkpoint: a run stopped one step before early stopping ended
    the straight run, and resumed, stops at the same step with the same best checkpoint."""

    def patient(run, **kw):
        return config_from_dict(tiny_config(dataset, run, epochs=4, eval_every=1, patience=2, **kw))

    straight = train(patient(tmp_path / "straight"))
    assert straight["reason"].startswith("early stopping") and straight["step"] >= 3, straight
    train(patient(tmp_path / "split", max_steps=straight["step"] - 1))
    resumed = train(patient(tmp_path / "split"), resume=True)
    assert (resumed["reason"], resumed["step"], resumed["best_step"], resumed["best_val_acc"]) == (
        straight["reason"], straight["step"], straight["best_step"], straight["best_val_acc"],
    )  # fmt: skip
    for tag in ("last", "best"):
        a, b = weights(tmp_path / "straight", tag), weights(tmp_path / "split", tag)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], tag
