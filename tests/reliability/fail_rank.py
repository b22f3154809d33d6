"""Test helper: the training script, with rank 1 raising at its third step (run under the deepspeed launcher)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.nn.functional as F  # noqa: E402

import fastfilm.train as train  # noqa: E402

calls = {"n": 0}
real_cross_entropy = F.cross_entropy


def failing_cross_entropy(*args, **kwargs):
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 3:
        raise RuntimeError("injected failure on rank 1")
    return real_cross_entropy(*args, **kwargs)


train.F.cross_entropy = failing_cross_entropy

if __name__ == "__main__":
    raise SystemExit(train.main())
