"""The fused ResBlock op `kernels.bn_film_relu` (BN without affine → FiLM → ReLU → + residual), train mode.

One group per (pass, dtype, shape): reference / triton / compile side by side, with the achieved GB/s
(`benchlib.bn_film_relu_bytes`: the minimum traffic ÷ time) in extra_info.
"""

from __future__ import annotations

import benchlib
import pytest
import torch

IMPLS = ["reference", "triton", "compile"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_bn_film_relu(benchmark, settings, op_n, impl, dtype, pass_):
    reason = benchlib.skip_reason(impl, settings)
    if reason:
        pytest.skip(reason)
    import kernels

    benchlib.fresh_compile_state(impl)
    graphs_before = benchlib.compiled_graphs()

    n, c, hw = op_n, settings.op_c, settings.op_hw
    tdtype = benchlib.DTYPES[dtype]
    backward = pass_ == "fwdbwd"
    z, gamma, beta, r, rm, rv, dout = benchlib.bn_film_relu_inputs(n, c, hw, tdtype, backward)

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

    benchmark.group = f"op/bn_film_relu {pass_} {dtype} N={n} C={c} {hw}x{hw}"
    nbytes = benchlib.bn_film_relu_bytes(n, c, hw, hw, tdtype.itemsize, backward)
    benchmark.extra_info.update(
        kind="op",
        op="bn_film_relu",
        impl=impl,
        **{"pass": pass_},
        dtype=dtype,
        shape=[n, c, hw, hw],
        bytes_moved=nbytes,
        device=benchlib.device_name(),
    )
    # Tiny GPU kernels: several calls per round so that the synchronisation is not what gets measured.
    benchlib.run(benchmark, fn, settings, min_round_s=1e-3, max_iterations=50 if settings.cuda else 1)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9
    if impl == "compile":
        benchmark.extra_info["dynamo_graphs"] = benchlib.compiled_graphs() - graphs_before
        assert benchmark.extra_info["dynamo_graphs"] >= 1, (
            "impl=compile compiled nothing: not a compile timing"
        )
