"""The model's inference forward — what `fastfilm eval`, `analyze` and `predict` run — per autocast precision, side
by side: fp32, bf16, fp16 (questions/s). extra_info says what `--precision auto` runs here for a model trained in
that precision (`fastfilm.auto.inference_precision`): the rule keeps the model's own unless this device only
emulates it. GPU: configs/clevr.json, its batch, eval mode (running statistics), channels_last as `eval` places
it. CPU: the bench's small model at batch 64 (an evaluation's batch), so per-question costs dominate, not Python.
"""

from __future__ import annotations

import benchlib
import pytest
import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", list(PRECISIONS))
def test_inference_forward(benchmark, settings, dtype):
    from fastfilm.auto import inference_precision
    from fastfilm.model import place

    cfg = benchlib.bench_config(settings)
    model = place(benchlib.build_model(cfg, "reference").eval(), benchlib.device())
    n = cfg.batch_size if settings.cuda else 64
    batch = benchlib.synthetic_batch(cfg, batch=n)
    amp = PRECISIONS[dtype]

    def fn():
        with torch.no_grad(), benchlib.autocast(amp):
            return model(batch["image"], batch["question"], batch["length"])

    logits = fn()
    assert torch.isfinite(logits.float()).all().item(), "the benchmark's own forward is not finite"
    cfg.deepspeed["bf16"] = {"enabled": dtype == "bf16"}
    cfg.deepspeed["fp16"] = {"enabled": dtype == "fp16"}
    auto = inference_precision(cfg, benchlib.device())
    benchmark.group = f"inference/forward image={cfg.model.image_size} batch={n}"
    benchmark.extra_info.update(
        kind="inference",
        impl=dtype,
        dtype=dtype,
        batch=n,
        image_size=cfg.model.image_size,
        auto_for_a_model_trained_in_it=f"{auto.value} ({auto.reason})",
        device=benchlib.device_name(),
    )
    benchlib.run(benchmark, fn, settings)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["questions_per_s"] = n / median
