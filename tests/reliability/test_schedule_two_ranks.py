"""Two CPU ranks (one launch of `schedule_runs.py`): a WarmupLR schedule under ZeRO 1 with accumulation and
gradient clipping is logged as applied and resumes bit-exact; `data.max_val_questions` with an odd count is
scored exactly once over the ranks; a time budget that one rank's clock has spent stops both at the same step."""

import json

import torch

from tests.reliability.test_distributed import launch_args
from tests.test_train import tiny_config, weights


def records(run, key):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_schedule_zero1_resume_val_limit_and_time_budget_on_two_ranks(dataset, tmp_path):
    # 48 questions, 2 ranks × micro-batch 4 × accumulation 2 = 16 a step: 3 steps per epoch.
    raw = tiny_config(dataset, tmp_path / "unused", epochs=5, log_every=1, eval_every=2)
    raw["data"]["max_val_questions"] = 7  # of 18: ranks hold 4 and 3 of them at micro-batch 4
    raw["deepspeed"].update(
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=2,
        gradient_clipping=0.5,
        zero_optimization={"stage": 1},
        scheduler={
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 1e-4,
                "warmup_max_lr": 1e-3,
                "warmup_num_steps": 4,
                "warmup_type": "linear",
            },
        },
    )
    cfg = tmp_path / "base.json"
    cfg.write_text(json.dumps(raw))
    proc = launch_args("tests/reliability/schedule_runs.py", [cfg, tmp_path], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    straight, split = tmp_path / "straight", tmp_path / "split"
    lrs = records(straight, "train/lr")
    # WarmupLR (linear, 4 steps) as DeepSpeed applies it: the minimum for steps 1 and 2, then +1/4 of the range.
    expected = [1e-4, 1e-4, 3.25e-4, 5.5e-4, 7.75e-4, 1e-3]
    assert [s for s, _ in lrs] == list(range(1, 7))
    assert all(abs(a - b) < 1e-12 for (_, a), b in zip(lrs, expected)), lrs
    assert records(split, "train/lr") == lrs
    assert records(split, "train/grad_norm") == records(straight, "train/grad_norm")
    a, b = weights(straight), weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    state = json.loads((straight / "checkpoints/last/trainer_state.json").read_text())
    assert json.loads((split / "checkpoints/last/trainer_state.json").read_text()) == state
    # Every evaluation (steps 2, 4, 6 straight; 2, and 4, 6 resumed; the budget run's) scored 7 questions.
    totals = [json.loads(x) for x in (tmp_path / "eval_totals.0.jsonl").read_text().splitlines()]
    assert totals == [7] * 7, totals
    assert (tmp_path / "eval_totals.1.jsonl").read_text() == (tmp_path / "eval_totals.0.jsonl").read_text()

    s0, s1 = (json.loads((tmp_path / f"budget_summary.{r}.json").read_text()) for r in (0, 1))
    assert s0["reason"] == s1["reason"] == "train.max_minutes" and s0["step"] == s1["step"] == 1, (s0, s1)
