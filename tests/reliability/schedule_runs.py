"""Test helper for test_schedule_two_ranks.py, run on 2 ranks by the deepspeed launcher (one start-up for every
run compared there).

`python schedule_runs.py CONFIG OUT`: with the config's WarmupLR schedule, ZeRO 1, accumulation, clipping and
`data.max_val_questions`, `OUT/straight` trains 6 steps, `OUT/split` 3 steps and then `--resume` to 6; each rank
appends every evaluation's question count to `OUT/eval_totals.{rank}.jsonl`. Then `OUT/budget` runs with a time
budget that only rank 1's clock has spent; each rank writes its summary to `OUT/budget_summary.{rank}.json`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import fastfilm.train as train_mod  # noqa: E402
from fastfilm.config import config_from_dict  # noqa: E402


def main(cfg_path: str, out: str) -> None:
    base = json.load(open(cfg_path))
    rank = int(os.environ["RANK"])
    real_evaluate = train_mod.evaluate_model

    def counted(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        with open(f"{out}/eval_totals.{rank}.jsonl", "a") as f:
            f.write(json.dumps(result["total"]) + "\n")
        return result

    train_mod.evaluate_model = counted

    def config(run_dir: str, **train_kw):
        raw = json.loads(json.dumps(base))
        raw["train"].update(run_dir=f"{out}/{run_dir}", **train_kw)
        return config_from_dict(raw)

    train_mod.train(config("straight", max_steps=6))
    train_mod.train(config("split", max_steps=3))
    train_mod.train(config("split", max_steps=6), resume=True)

    if rank == 1:  # only this rank's clock says the budget is spent
        train_mod.Run.minutes = lambda self: 1e9
    summary = train_mod.train(config("budget", max_steps=6, max_minutes=1000, sync_every=1))
    with open(f"{out}/budget_summary.{rank}.json", "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
