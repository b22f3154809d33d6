"""Test helper, run on 2 ranks by the deepspeed launcher: `python train_runs.py [--checksums] ARGS [--then ARGS]...`
runs the trainer's command line (`fastfilm/train.py ARGS`) once per group, in turn, in one launch: one start-up of
the launcher and its ranks (~15 s on 2 AVX2 cores) instead of one per run. Rank 0 prints RUN_MARK before each run
(test_distributed.split_runs cuts the launcher's output there). Stops at the first run that fails.

--checksums: every save also writes the rank's parameter and buffer checksums to RUN/rank_checksums.{rank}.json
(ranks in step have equal checksums)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import fastfilm.train as train  # noqa: E402

RUN_MARK = "=== train_runs: run {} ==="


def checksum(tensors) -> list[float]:
    """Two sums over floating-point tensors, the second weighted by position (catches swapped values)."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        if t.is_floating_point():
            v = t.detach().double().cpu().flatten()
            total += torch.stack([v.sum(), (v * (1 + (i % 7))).abs().sum()])
    return total.tolist()


def record_checksums() -> None:
    """Wrap the trainer's save: after each, append this rank's checksums to RUN/rank_checksums.{rank}.json."""
    real_save = train.save

    def save_and_record(run, state, tag):
        real_save(run, state, tag)
        module = run.engine.module
        path = os.path.join(run.cfg.train.run_dir, f"rank_checksums.{run.rank}.json")
        records = json.load(open(path)) if os.path.exists(path) else []
        records.append(
            {"step": state.step, "tag": tag, "parameters": checksum(module.parameters()),
             "buffers": checksum(module.buffers())}
        )  # fmt: skip
        with open(path, "w") as f:
            json.dump(records, f)

    train.save = save_and_record


def groups(argv: list[str]) -> list[list[str]]:
    """ARGS [--then ARGS]... → one argument list per run."""
    out: list[list[str]] = [[]]
    for a in argv:
        if a == "--then":
            out.append([])
        else:
            out[-1].append(a)
    return [g for g in out if g]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--checksums"]:
        record_checksums()
        argv = argv[1:]
    for k, args in enumerate(groups(argv)):
        if os.environ.get("RANK", "0") == "0":
            print(RUN_MARK.format(k), flush=True)
        rc = train.main(args)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
