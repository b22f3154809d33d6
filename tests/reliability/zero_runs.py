"""Test helper for test_zero.py, run on 2 ranks by the deepspeed launcher: every training run the ZeRO tests
compare, in one launch (one start-up of DeepSpeed instead of ten).

`python zero_runs.py CONFIG OUT`: for each case, `OUT/NAME_straight` trains 9 steps, `OUT/NAME_split` 4 steps and
then `--resume` to 9. Last, `OUT/stage0_mid` trains 4 steps (stage 0) and records the question indices each rank
trained on (`OUT/indices_rank{R}.jsonl`), for the resume-on-another-layout test.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fastfilm.config import config_from_dict  # noqa: E402
from fastfilm.data.loader import Loader  # noqa: E402
from fastfilm.train import train  # noqa: E402

CASES = {  # name: (zero stage, bf16, steps straight, steps before the resume)
    "stage0": (0, False, 9, 4),
    "stage1": (1, False, 9, 4),
    "stage2": (2, False, 9, 4),
    "stage0_bf16": (0, True, 5, 2),
    "stage2_bf16": (2, True, 5, 2),
}
RECORD: dict = {"path": None}
real_epoch = Loader.epoch


def recording_epoch(self, epoch, start_batch=0, start_question=0):
    for batch in real_epoch(self, epoch, start_batch, start_question):
        if RECORD["path"] and self.drop_last:  # training batches only
            with open(RECORD["path"], "a") as f:
                f.write(json.dumps({"epoch": epoch, "index": batch["index"].tolist()}) + "\n")
        yield batch


Loader.epoch = recording_epoch


def config(base: dict, run_dir: str, stage: int, bf16: bool, steps: int):
    raw = json.loads(json.dumps(base))
    raw["train"].update(run_dir=run_dir, max_steps=steps)
    raw["deepspeed"]["zero_optimization"] = {"stage": stage}
    if bf16:
        raw["deepspeed"]["bf16"] = {"enabled": True}
    return config_from_dict(raw)


def main(cfg_path: str, out: str) -> None:
    base = json.load(open(cfg_path))
    rank = int(os.environ["RANK"])
    for name, (stage, bf16, steps, first) in CASES.items():
        train(config(base, f"{out}/{name}_straight", stage, bf16, steps))
        train(config(base, f"{out}/{name}_split", stage, bf16, first))
        train(config(base, f"{out}/{name}_split", stage, bf16, steps), resume=True)
    RECORD["path"] = f"{out}/indices_rank{rank}.jsonl"
    train(config(base, f"{out}/stage0_mid", 0, False, 4))  # stopped mid-epoch: resumed on 1 rank by the test


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
