"""The fused ResBlock op `kernels.bn_film_relu` (BN without affine → FiLM → ReLU → + residual), train mode.

One group per (pass, dtype, shape, layout, where): reference / triton / compile side by side, with the achieved
GB/s (`benchlib.bn_film_relu_bytes`: the minimum traffic ÷ time) in extra_info. `where`: `eager` (each call
launched from Python: launch latency and host overhead count) or `graph` (the calls captured once into a CUDA
graph and replayed, as in the trainer's graph mode: GPU time and launch gaps only; GPU only). Layout `nhwc`
(channels_last, the GPU's default) is timed on a GPU only. `test_bn_relu` is the stem's and classifier's BatchNorm +
ReLU (`fastfilm.model.BatchNormReLU`: the same op with γ, β the BatchNorm's own, broadcast) at the paper's stem
sizes, GPU only.
"""

from __future__ import annotations

import benchlib
import pytest
import torch

IMPLS = ["reference", "triton", "compile"]


def where_skip(where: str, layout: str, settings) -> str | None:
    if where == "graph" and not settings.cuda:
        return "CUDA graphs need a GPU"
    if layout == "nhwc" and not settings.cuda:
        return "channels_last is the GPU's layout (the CPU trains in NCHW)"
    return None


def timed_fn(fn, where: str):
    """`fn`, or (where='graph') the replay of a CUDA graph that captured one call of it."""
    if where != "graph":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@pytest.mark.parametrize("where", ["eager", "graph"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_bn_film_relu(benchmark, settings, op_n, impl, dtype, pass_, layout, where):
    reason = benchlib.skip_reason(impl, settings) or where_skip(where, layout, settings)
    if reason:
        pytest.skip(reason)
    if settings.quick and not settings.cuda and impl == "compile" and dtype == "fp32":
        pytest.skip("--bench-quick on a CPU: compile only in bf16 (each compilation costs ~5-20 s here)")
    import kernels

    benchlib.fresh_compile_state(impl)
    graphs_before = benchlib.compiled_graphs()

    n, c, hw = op_n, settings.op_c, settings.op_hw
    tdtype = benchlib.DTYPES[dtype]
    backward = pass_ == "fwdbwd"
    z, gamma, beta, r, rm, rv, dout = benchlib.bn_film_relu_inputs(n, c, hw, tdtype, backward, layout=layout)

    def forward():
        return kernels.bn_film_relu(
            z, gamma, beta, r, rm, rv, training=True, momentum=0.1, eps=1e-5, impl=impl
        )

    if backward:

        def fn():
            out = forward()
            # autograd.grad, not .backward(): no accumulation into .grad (an extra pass that is not the op's)
            return torch.autograd.grad(out, (z, gamma, beta, r), dout)

    else:

        def fn():
            with torch.no_grad():
                return forward()

    # Shape-check before timing (the tests compare values; this only guards the benchmark's own inputs).
    res = fn()
    if backward:
        assert [t.shape for t in res] == [z.shape, gamma.shape, beta.shape, r.shape]
    else:
        assert res.shape == z.shape and res.dtype == z.dtype

    benchmark.group = f"op/bn_film_relu {pass_} {dtype} N={n} C={c} {hw}x{hw} {layout} {where}"
    nbytes = benchlib.bn_film_relu_bytes(n, c, hw, hw, tdtype.itemsize, backward)
    benchmark.extra_info.update(
        kind="op",
        op="bn_film_relu",
        impl=impl,
        **{"pass": pass_},
        dtype=dtype,
        shape=[n, c, hw, hw],
        layout=layout,
        where=where,
        bytes_moved=nbytes,
        device=benchlib.device_name(),
    )
    # Tiny GPU kernels: several calls per round so that the synchronisation is not what gets measured.
    benchlib.run(
        benchmark, timed_fn(fn, where), settings, min_round_s=1e-3, max_iterations=50 if settings.cuda else 1
    )
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9
    if impl == "compile":
        benchmark.extra_info["dynamo_graphs"] = benchlib.compiled_graphs() - graphs_before
        assert benchmark.extra_info["dynamo_graphs"] >= 1, (
            "impl=compile compiled nothing: not a compile timing"
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hw", [112, 56, 28, 14])
def test_bn_relu(benchmark, settings, impl, hw):
    """The stem's (112², 56², 28² at 224 px) and the classifier's (14²) BatchNorm + ReLU, batch 64, 128 channels,
    bf16 autocast, channels_last, forward + backward, in a CUDA graph: `BatchNormReLU` per kernels mode."""
    if not settings.cuda:
        pytest.skip("the paper's stem sizes are a GPU case (up to 100M elements per call)")
    from fastfilm.model import BatchNormReLU

    n, c = 64, 128
    dev = benchlib.device()
    bn = BatchNormReLU(c, impl).to(dev).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(dev, torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dout = (
        torch.randn(n, c, hw, hw, generator=g)
        .to(dev, torch.bfloat16)
        .contiguous(memory_format=torch.channels_last)
    )
    if impl == "compile":
        benchlib.fresh_compile_state(impl)
        bn.forward = torch.compile(bn.forward, dynamic=False)

    def fn():
        return torch.autograd.grad(bn(x), (x, bn.weight, bn.bias), dout)

    fn()
    benchmark.group = f"op/bn_relu fwdbwd bf16 N={n} C={c} {hw}x{hw} nhwc graph"
    nbytes = benchlib.bn_film_relu_bytes(n, c, hw, hw, 2, True)
    benchmark.extra_info.update(
        kind="op", op="bn_relu", impl=impl, **{"pass": "fwdbwd"}, dtype="bf16", shape=[n, c, hw, hw],
        layout="nhwc", where="graph", bytes_moved=nbytes, device=benchlib.device_name(),
    )  # fmt: skip
    benchlib.run(benchmark, timed_fn(fn, "graph"), settings, min_round_s=1e-3, max_iterations=50)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9
