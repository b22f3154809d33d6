"""The FiLM generator alone (embedding → GRU → state at <END> → linear → γ, β): the step's largest FLOP user.

Same config, batch and question length as the train-step group, so `bench/report.py` can state its share of
the step's time (generator fwd+bwd ÷ train step, per dtype and kernels mode). TFLOP/s counts the GEMMs over the
real tokens only (the encoder is packed; `benchlib.gru_flops`; backward ≈ 2× forward).
"""

from __future__ import annotations

import benchlib
import pytest
import torch


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_generator(benchmark, settings, dtype, pass_):
    cfg = benchlib.bench_config(settings)
    gen = benchlib.build_model(cfg, "reference").generator
    batch = benchlib.synthetic_batch(cfg)
    questions = batch["question"]
    amp = benchlib.DTYPES[dtype]
    backward = pass_ == "fwdbwd"

    def fn():
        if not backward:
            with torch.no_grad(), benchlib.autocast(amp):
                return gen(questions)
        gen.zero_grad(set_to_none=True)
        with benchlib.autocast(amp):
            gammas, betas = gen(questions)
        (gammas.float().square().mean() + betas.float().square().mean()).backward()
        return gammas, betas

    gammas, betas = fn()
    n, t = questions.shape
    assert gammas.shape == betas.shape == (n, cfg.model.num_blocks, cfg.model.module_dim)

    # The generator reads only real tokens (packed): count those, not the padding.
    per_token = benchlib.gru_flops(cfg, 1, 1) - benchlib.gru_flops(cfg, 1, 0)
    tokens = int((questions != 0).sum())
    flops = (benchlib.gru_flops(cfg, n, t) - per_token * (n * t - tokens)) * (3 if backward else 1)
    benchmark.group = f"generator/{dtype} batch={n} T={t} hidden={cfg.model.rnn_hidden_dim}"
    benchmark.extra_info.update(
        {
            "kind": "generator",
            "impl": "reference",
            "pass": pass_,
            "dtype": dtype,
            "batch": n,
            "question_len": t,
            "real_tokens": tokens,
            "rnn_hidden_dim": cfg.model.rnn_hidden_dim,
            "gflop": flops / 1e9,
            "device": benchlib.device_name(),
        }
    )
    benchlib.run(benchmark, fn, settings)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["tflop_per_s"] = flops / median / 1e12
        benchmark.extra_info["questions_per_s"] = n / median
