"""Test helper: the training script, writing each rank's parameter and buffer checksums at every save to
RUN/rank_checksums.{rank}.json (run under the deepspeed launcher; ranks in step have equal checksums)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import fastfilm.train as train  # noqa: E402


def checksum(tensors) -> list[float]:
    """Two sums over floating-point tensors, the second weighted by position (catches swapped values)."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        if t.is_floating_point():
            v = t.detach().double().cpu().flatten()
            total += torch.stack([v.sum(), (v * (1 + (i % 7))).abs().sum()])
    return total.tolist()


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

if __name__ == "__main__":
    raise SystemExit(train.main())
