"""One full training step of the raw-pixel FiLM model, per kernels mode, in bf16 (autocast) and float32.

The step is the trainer's own `fastfilm.train.train_step` on the engine `fastfilm.train.build_engine` makes:
autocast forward (bf16 runs, DeepSpeed's `torch_autocast`), float32 cross-entropy, `engine.backward`,
`engine.step` (Adam with coupled L2; fused on CUDA). Not in this number: the loader (it has its own group; inputs
are one fixed synthetic batch on the device) and the ranks' agreement every `train.sync_every` steps. GPU: configs/clevr.json (the paper's model,
224×224 pixels, batch 64, questions padded to 46 tokens). CPU: a small model of the same structure.

CUDA graphs: this harness has no capture path (graph mode's step is bench/gpu_step.py's), so the step runs
eagerly whatever `train.cuda_graphs` says; extra_info["cuda_graphs"] says so in the JSON.
"""

from __future__ import annotations

import gc

import benchlib
import pytest
import torch
import workload


def cuda_graphs_note(cfg) -> str:
    if not hasattr(cfg.train, "cuda_graphs"):
        return "not used: the config has no train.cuda_graphs key"
    return "train.cuda_graphs is set, but this harness has no graph-capture path yet: eager step"


@pytest.mark.parametrize("kernels_mode", ["reference", "triton", "compile"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_train_step(benchmark, settings, kernels_mode, dtype):
    reason = benchlib.skip_reason(kernels_mode, settings)
    if reason:
        pytest.skip(reason)
    if settings.quick and not settings.cuda and kernels_mode == "compile" and dtype == "fp32":
        pytest.skip("--bench-quick on a CPU: compile step only in bf16 (each compilation costs ~15 s here)")
    cfg = benchlib.bench_config(settings)
    benchlib.fresh_compile_state(kernels_mode)
    graphs_before = benchlib.compiled_graphs()
    engine = benchlib.build_engine(cfg, kernels_mode, benchlib.DTYPES[dtype] if dtype != "fp32" else None)
    batch = benchlib.synthetic_batch(cfg)
    step = benchlib.make_train_step(engine, batch)

    loss = step()
    assert torch.isfinite(loss).item(), "the benchmark's own step diverged"

    n = batch["question"].shape[0]
    benchmark.group = f"train_step/{dtype} image={cfg.model.image_size} batch={n}"
    benchmark.extra_info.update(
        kind="train_step",
        impl=kernels_mode,
        dtype=dtype,
        batch=n,
        image_size=cfg.model.image_size,
        question_len=batch["question"].shape[1],
        model="configs/clevr.json" if settings.cuda else "small (bench/benchlib.py SMALL_MODEL_OVERRIDES)",
        optimizer=type(engine.optimizer).__module__ + "." + type(engine.optimizer).__name__,
        cuda_graphs=cuda_graphs_note(cfg),
        device=benchlib.device_name(),
    )
    # The step's work, for its achieved GFLOP/s beside the machine's matmul ceiling (bench/report.py).
    benchmark.extra_info["gflop_per_step"] = workload.step_gflop(
        cfg.model, batch["length"], batch["question"].shape[1]
    )
    # compile: the first calls compile forward and backward graphs; they are warm-up, never timed.
    warmup = settings.warmup + (2 if kernels_mode == "compile" else 0)
    benchlib.run(benchmark, step, settings, warmup=warmup)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["questions_per_s"] = n / median
        benchmark.extra_info["gflop_per_s"] = benchmark.extra_info["gflop_per_step"] / median
    if kernels_mode == "compile":
        benchmark.extra_info["dynamo_graphs"] = benchlib.compiled_graphs() - graphs_before
        assert benchmark.extra_info["dynamo_graphs"] >= 1, (
            "kernels=compile compiled nothing: not a compile timing"
        )
    del engine, step
    gc.collect()
    if settings.cuda:
        torch.cuda.empty_cache()
