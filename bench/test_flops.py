"""Work per question and the machine's ceiling (not timings of fastfilm code):

- `flops/…`: GFLOP per question, forward and forward + backward, for every shipped config (configs/*.json):
  packed (fastfilm now), padded to a batch's expected longest question (fastfilm before packing) and padded to
  the dataset's longest (the original code). Counted on the meta device (`bench/workload.py`). Lengths: the
  synthetic set built for this session for configs/synthetic.json; CLEVR's mean (20.4 tokens) for the CLEVR
  configs, or the real distribution of a CLEVR prep cache given with `--bench-lengths CACHE`.
- `ceiling/…`: the machine's own square-matmul GFLOP/s in fp32 and bf16, on the same threads as the other
  benchmarks, so `bench/report.py` can put each train step's achieved GFLOP/s beside it as a ratio. The size is
  chosen per dtype by a 128² probe (`fastfilm.auto.sized_matmul`) so that one product takes about 0.05 s
  (`--bench-quick`) or 0.2 s, at most 2048² on a CPU (8192² on a GPU): a dtype without hardware support (bf16 on
  an AVX2-only CPU: a scalar GEMM at ~1 GFLOP/s) is measured at a smaller size and shows as a slow dtype in the
  report, instead of running minutes per round.
"""

from __future__ import annotations

import os

import benchlib
import pytest
import torch
import workload

CONFIGS = [os.path.basename(p) for p in workload.shipped_configs(benchlib.ROOT)]
# --bench-quick counts the paper's model and make train's only (~3-6 s of counting each)
QUICK_CONFIGS = ("clevr.json", "synthetic.json")


@pytest.mark.parametrize("config", CONFIGS)
def test_flops_per_question(benchmark, request, settings, bench_dataset, config):
    if settings.quick and config not in QUICK_CONFIGS:
        pytest.skip(f"--bench-quick: the FLOP counts of {', '.join(QUICK_CONFIGS)} only")
    from fastfilm.config import load_config

    cfg = load_config(os.path.join(benchlib.ROOT, "configs", config))
    cache = request.config.getoption("--bench-lengths")
    if "synthetic" in config:
        lengths, source = workload.lengths_of_cache(bench_dataset["cache"]), "this session's synthetic set"
    elif cache:
        lengths, source = workload.lengths_of_cache(cache), f"{cache} (train split)"
    else:
        lengths, source = None, "CLEVR's mean, 20.4 tokens (18.4 words + <START>/<END>)"
    padded = int(lengths.max()) if lengths is not None else workload.CLEVR_PADDED_TOKENS
    table = benchmark.pedantic(
        workload.flops_table, args=(cfg.model, lengths, cfg.batch_size, padded), rounds=1, iterations=1
    )
    # The count must see the work: packing reads fewer tokens than the dataset-wide padding.
    assert 0 < table["packed_fwd_gflop"] < table["packed_fwdbwd_gflop"]
    assert table["packed_fwdbwd_gflop"] < table["original_fwdbwd_gflop"]
    benchmark.group = f"flops/{config}"
    benchmark.extra_info.update(
        kind="flops",
        impl="count",
        config=config,
        batch=cfg.batch_size,
        lengths_source=source,
        device="meta (FlopCounterMode)",
        **table,
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul_ceiling(benchmark, settings, dtype):
    from fastfilm.auto import sized_matmul

    dt = benchlib.DTYPES[dtype]
    dev = benchlib.device()
    n, probe_gflops = sized_matmul(
        dt, dev, max_seconds=0.05 if settings.quick else 0.2, n_max=8192 if settings.cuda else 2048
    )
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dt)
    b = torch.randn(n, n, generator=g).to(dev, dt)
    benchmark.group = "ceiling/matmul, square, sized per dtype"
    benchmark.extra_info.update(
        kind="ceiling",
        impl=f"{dtype} {n}²",
        dtype=dtype,
        n=n,
        probe_gflop_per_s=probe_gflops,
        threads=torch.get_num_threads(),
        device=benchlib.device_name(),
    )
    benchlib.run(benchmark, lambda: torch.mm(a, b), settings)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["gflop_per_s"] = 2 * n**3 / median / 1e9
