"""model.memory_format=channels_last trains under the real DeepSpeed launcher (2 CPU ranks) and gives channels_first's
logits within float32 rounding. DeepSpeed's parameter broadcast in `deepspeed.initialize` refuses channels_last
parameters ("self.stride(-1) must be 1 to view Float as Byte"): the trainer converts the model after it."""

import json

import torch

from fastfilm.config import config_from_dict
from fastfilm.model import FiLMModel
from tests.reliability.test_distributed import launch_args
from tests.test_graphed import assert_trained_weights_close
from tests.test_train import tiny_config, weights


def test_channels_last_trains_under_the_launcher_with_channels_firsts_logits(dataset, tmp_path):
    models, losses, raws = {}, {}, {}
    for fmt in ("channels_first", "channels_last"):
        raw = tiny_config(dataset, tmp_path / fmt, max_steps=3, log_every=1)
        raw["model"]["memory_format"] = fmt
        raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 4  # 2 ranks × 4: the same global batch of 8
        (tmp_path / f"{fmt}.json").write_text(json.dumps(raw))
        raws[fmt] = raw
    # Both runs in one launch of the trainer's command line (train_runs.py): one start-up of the ranks.
    paths = [tmp_path / f"{fmt}.json" for fmt in raws]
    proc = launch_args("tests/reliability/train_runs.py", paths, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for fmt, raw in raws.items():
        run = tmp_path / fmt
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses[fmt] = [r["train/loss"] for r in rows if "train/loss" in r]
        cfg = config_from_dict(raw)
        vocab = json.loads((run / "checkpoints" / "last" / "vocab.json").read_text())
        model = FiLMModel(cfg.model, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]))
        model.load_state_dict(weights(run))
        models[fmt] = model.train()
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
