"""bn_film_relu on the inputs a real model or user hands it: float16 and float64, mixed dtypes, views and
broadcast FiLM parameters, partial requires_grad, odd incoming gradients, degenerate shapes, bad arguments.
Each case is compared with the plain-PyTorch reference (outputs, every gradient, running statistics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import bn_film_relu
from tests.kernels.helpers import FP32_REL, assert_rel_close, rel_error
from tests.kernels.test_bn_film_relu import MODES, check_against_reference, make_inputs


def _kw(mode: str) -> dict:
    return dict(training=mode == "train", normalize=mode != "no_bn")


def _buffers(inp: dict, mode: str, dtype: torch.dtype = torch.float32):
    if mode == "no_bn":
        return None, None
    return inp["running_mean"].to(dtype).clone(), inp["running_var"].to(dtype).clone()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_float16(device, bn_path, mode, residual):
    """float16 activations and FiLM parameters (autocast fp16 is a supported precision): within FP16_REL of the
    float32 reference, gradients in float16, running statistics in float32."""
    check_against_reference(make_inputs((3, 5, 7, 7), device, torch.float16, seed=20), mode, residual)


@pytest.mark.parametrize("mode", MODES)
def test_float16_activations_with_float32_film_params(device, bn_path, mode):
    """What fp16 autocast hands the op: a float16 conv output and residual, float32 γ/β."""
    inp = make_inputs((3, 5, 7, 7), device, torch.float16, gamma_dtype=torch.float32, seed=21)
    check_against_reference(inp, mode)


@pytest.mark.parametrize("mode", MODES)
def test_residual_in_another_dtype(device, bn_path, mode):
    """A float32 residual added to a bf16 BN branch: the output keeps z's dtype, dr comes back in float32."""
    inp = make_inputs((3, 5, 7, 7), device, torch.bfloat16, seed=22)
    inp["residual"] = inp["residual"].float()
    check_against_reference(inp, mode)


@pytest.mark.parametrize("mode", MODES)
def test_float64_equals_float64_reference(device, bn_path, mode):
    """float64 everywhere (running buffers too): the kernels accumulate in float64, so the reference in float64
    must agree to ~1e-12, outputs, gradients and buffers (a shape that is no multiple of any block)."""
    inp = make_inputs((3, 5, 7, 6), device, torch.float64, seed=23)
    results = []
    for impl in ("triton", "reference"):
        leaves = [inp[k].clone().requires_grad_() for k in ("z", "gamma", "beta", "residual")]
        rm, rv = _buffers(inp, mode, torch.float64)
        out = bn_film_relu(*leaves, rm, rv, impl=impl, **_kw(mode))
        out.backward(inp["dout"])
        results.append((out, [t.grad for t in leaves], rm, rv))
    (out, grads, rm, rv), (ref_out, ref_grads, ref_rm, ref_rv) = results
    assert out.dtype == torch.float64
    assert_rel_close(out, ref_out, 1e-12, "out")
    for name, g, rg in zip(("z", "gamma", "beta", "residual"), grads, ref_grads):
        assert g.dtype == torch.float64
        assert_rel_close(g, rg, 1e-11, f"d{name}")
    if rm is not None:
        assert_rel_close(rm, ref_rm, 1e-14, "running_mean")
        assert_rel_close(rv, ref_rv, 1e-14, "running_var")


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_film_params(device, bn_path, mode):
    """γ expanded over the batch (stride 0) and β expanded from one scalar (both strides 0): read in place, and
    their gradients summed back over the expansion as autograd does for the reference."""
    n, c = 4, 5
    inp = make_inputs((n, c, 6, 5), device, seed=24)
    grads = []
    for impl in ("triton", "reference"):
        g_row = inp["gamma"][:1].clone().requires_grad_()
        b_one = inp["beta"][0, 0].clone().requires_grad_()
        z = inp["z"].clone().requires_grad_()
        gamma, beta = g_row.expand(n, c), b_one.expand(n, c)
        assert gamma.stride() == (0, 1) and beta.stride() == (0, 0)
        rm, rv = _buffers(inp, mode)
        out = bn_film_relu(z, gamma, beta, None, rm, rv, impl=impl, **_kw(mode))
        out.backward(inp["dout"])
        grads.append((out, z.grad, g_row.grad, b_one.grad, rm, rv))
    for name, a, b in zip(("out", "dz", "dgamma", "dbeta", "running_mean", "running_var"), *grads):
        if a is not None or b is not None:
            assert_rel_close(a, b, FP32_REL, name)


@pytest.mark.parametrize(
    "needs",
    [("z",), ("gamma",), ("beta",), ("residual",), ("gamma", "beta"), ()],
    ids=lambda s: "+".join(s) or "none",
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_only_some_inputs_require_grad(device, bn_path, needs, mode):
    """Only some inputs require grad (a frozen generator, a frozen network, inference): the requested gradients
    match the reference, the others stay None; with none requested the output has no graph."""
    inp = make_inputs((3, 5, 7, 7), device, seed=25)
    results = []
    for impl in ("triton", "reference"):
        leaves = {k: inp[k].clone().requires_grad_(k in needs) for k in ("z", "gamma", "beta", "residual")}
        rm, rv = _buffers(inp, mode)
        out = bn_film_relu(*leaves.values(), rm, rv, impl=impl, **_kw(mode))
        assert out.requires_grad == bool(needs)
        if needs:
            out.backward(inp["dout"])
        results.append((out, {k: v.grad for k, v in leaves.items()}, rm))
    (out, grads, rm), (ref_out, ref_grads, ref_rm) = results
    assert_rel_close(out, ref_out, FP32_REL, "out")
    if rm is not None:
        assert_rel_close(rm, ref_rm, FP32_REL, "running_mean")
    for k in grads:
        if k in needs:
            assert_rel_close(grads[k], ref_grads[k], FP32_REL, f"d{k}")
        else:
            assert grads[k] is None, f"d{k} should be None"


def test_strided_views(device, bn_path):
    """z a channel slice of a wider tensor (storage offset, channel stride ≠ C), the residual every other sample of
    a batch, and z2 a batch/channel transpose ([C, N, H, W] viewed as [N, C, H, W]): all flattenable, read through
    their strides with no copy."""
    n, c, h, w = 3, 5, 7, 6
    inp = make_inputs((n, c, h, w), device, seed=26)
    wide = torch.randn(n, c + 3, h, w, device=device)
    wide[:, 2 : 2 + c] = inp["z"]
    twice = torch.randn(2 * n, c, h, w, device=device)
    twice[::2] = inp["residual"]
    inp["z"], inp["residual"] = wide[:, 2 : 2 + c], twice[::2]
    assert (
        not inp["z"].is_contiguous() and inp["z"].storage_offset() > 0 and not inp["residual"].is_contiguous()
    )
    for mode in MODES:
        check_against_reference(inp, mode)
    inp["z"] = make_inputs((n, c, h, w), device, seed=27)["z"].transpose(0, 1).contiguous().transpose(0, 1)
    assert inp["z"].stride(0) < inp["z"].stride(1)
    check_against_reference(inp, "train")


@pytest.mark.parametrize(
    "make_dout",
    [
        lambda d: d[:1, :, :1, :1].expand_as(d),  # zero strides on N, H, W (a per-channel gradient)
        lambda d: d[:1].expand_as(d),  # zero stride on N only
        lambda d: d.contiguous(memory_format=torch.channels_last),  # channels_last while z is NCHW
        lambda d: d.transpose(2, 3).contiguous().transpose(2, 3),  # H, W not flattenable: copied explicitly
    ],
    ids=["per_channel", "batch_broadcast", "channels_last", "hw_transposed"],
)
@pytest.mark.parametrize("mode", MODES)
def test_grad_output_layouts(device, bn_path, make_dout, mode):
    """The incoming gradient in a layout other than z's, read through its strides (or copied when it cannot be)."""
    inp = make_inputs((3, 5, 7, 6), device, seed=28)
    inp["dout"] = make_dout(inp["dout"])
    check_against_reference(inp, mode)


@pytest.mark.parametrize(
    "shape",
    [(1, 5, 3, 4), (4, 5, 1, 1), (3, 1, 4, 5), (2, 3, 1, 7), (2, 3, 7, 1), (3, 2, 1, 1)],
    ids=["batch1", "hw1", "c1", "h1", "w1", "three_values"],
)
@pytest.mark.parametrize("mode", MODES)
def test_degenerate_shapes(device, bn_path, shape, mode):
    """Batch 1 (legal in training when H·W > 1), 1×1 maps, one channel, one row or column, 3 values per channel.
    (With 2 values per channel the training dz is exactly zero, so only rounding noise would be compared: the
    2-value case is checked on the forward and the buffers below.)"""
    check_against_reference(make_inputs(shape, device, seed=29), mode)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_degenerate_channels_last(device, bn_path, layout):
    """channels_last tensors whose layout is ambiguous (one channel; 1×1 maps) or unambiguous with one row."""
    for shape in ((3, 1, 4, 5), (4, 5, 1, 1), (2, 3, 1, 7)):
        inp = make_inputs(shape, device, seed=30)
        if layout == "channels_last":
            for k in ("z", "residual", "dout"):
                inp[k] = inp[k].contiguous(memory_format=torch.channels_last)
        check_against_reference(inp, "train")


def test_one_value_per_channel_in_training_is_refused_as_pytorch_does(device, bn_path):
    """Batch 1 with 1×1 maps in training: PyTorch raises ValueError (no variance); so do we, in every impl.
    In eval mode and without BN the same input is fine."""
    inp = make_inputs((1, 5, 1, 1), device, seed=31)
    z, g, b = inp["z"], inp["gamma"], inp["beta"]
    rm, rv = _buffers(inp, "train")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(z, rm, rv, training=True)
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn_film_relu(z, g, b, None, rm, rv, training=True, impl=impl)
    assert torch.equal(rm, inp["running_mean"]), "a refused call must not touch the running statistics"
    for mode in ("eval", "no_bn"):
        check_against_reference(inp, mode)
    two = make_inputs((2, 5, 1, 1), device, seed=31)
    results = []
    for impl in ("triton", "reference"):
        rm, rv = _buffers(two, "train")
        out = bn_film_relu(
            two["z"], two["gamma"], two["beta"], two["residual"], rm, rv, training=True, impl=impl
        )
        results.append((out, rm, rv))
    for name, a, b in zip(("out (2 values)", "running_mean", "running_var (M − 1 = 1)"), *results):
        assert_rel_close(a, b, FP32_REL, name)


def test_many_samples(device, bn_path, monkeypatch):
    """A batch far larger than the split size with the split cap reached (many samples per split, an uneven last
    split), as a batch of tens of thousands does on a GPU; one launch: many blocks of samples per channel; tiny
    maps keep the interpreter fast."""
    import importlib

    bn_module = importlib.import_module("kernels.bn_film_relu")
    monkeypatch.setattr(importlib.import_module("kernels._common"), "BN_SPLIT", (10, 1))
    monkeypatch.setattr(bn_module, "BN_ONE_LAUNCH_TILE", 16)
    tiles = bn_module._tile(3, 6, False)
    assert bn_module._split_plan(37, 3, 6, *tiles, torch.device("cpu")).splits == 4  # the last has 7 samples
    assert bn_module._one_launch_tile(37, 6, False) == (2, 8)  # one launch: 19 blocks of samples
    for mode in MODES:
        check_against_reference(make_inputs((37, 3, 2, 3), device, seed=32), mode)


def test_eval_uses_running_stats_and_leaves_them_alone(device, bn_path):
    """Eval mode normalises with the running statistics (not the batch's) and never writes them, also when the
    batch's statistics are far from them; training then moves them exactly as F.batch_norm does."""
    inp = make_inputs((4, 5, 6, 5), device, seed=33)
    inp["z"] = inp["z"] * 3 + 2  # batch statistics far from the buffers
    ones, zeros = torch.ones(4, 5, device=device), torch.zeros(4, 5, device=device)
    rm, rv = _buffers(inp, "eval")
    out = bn_film_relu(inp["z"], ones, zeros, None, rm, rv, training=False)
    expected = F.relu((inp["z"] - rm[:, None, None]) / (rv[:, None, None] + 1e-5).sqrt())
    assert_rel_close(out, expected, FP32_REL, "eval out")
    assert torch.equal(rm, inp["running_mean"]) and torch.equal(rv, inp["running_var"])
    ref_rm, ref_rv = rm.clone(), rv.clone()
    bn_film_relu(inp["z"], ones, zeros, None, rm, rv, training=True, momentum=0.25)
    F.batch_norm(inp["z"], ref_rm, ref_rv, training=True, momentum=0.25)
    assert_rel_close(rm, ref_rm, FP32_REL, "running_mean")
    assert_rel_close(rv, ref_rv, FP32_REL, "running_var")


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rejects_bad_arguments_naming_them(device, impl):
    """Wrong dtypes, devices and momentum: one clear error that names the argument, never a Triton crash or a
    silently wrong result (an integer z used to come back as an integer output)."""
    inp = make_inputs((3, 5, 4, 3), device, seed=34)
    z, g, b, r = inp["z"], inp["gamma"], inp["beta"], inp["residual"]
    rm, rv = _buffers(inp, "train")
    kw = dict(training=True, impl=impl)
    with pytest.raises(TypeError, match="bn_film_relu: z must be a floating-point tensor"):
        bn_film_relu(z.long(), g, b, None, rm, rv, **kw)
    with pytest.raises(TypeError, match="bn_film_relu: beta must be a floating-point tensor"):
        bn_film_relu(z, g, b.int(), None, rm, rv, **kw)
    with pytest.raises(TypeError, match="bn_film_relu: running_var must be a floating-point tensor"):
        bn_film_relu(z, g, b, None, rm, rv.long(), **kw)
    with pytest.raises(ValueError, match="bn_film_relu: gamma is on meta, z on cpu"):
        bn_film_relu(z.cpu(), g.to("meta"), b.cpu(), None, None, None, **kw)
    with pytest.raises(ValueError, match="bn_film_relu: running_mean is on meta, z on cpu"):
        bn_film_relu(z.cpu(), g.cpu(), b.cpu(), r.cpu(), rm.to("meta"), rv.cpu(), **kw)
    with pytest.raises(TypeError, match="bn_film_relu: momentum must be a number.*1 / num_batches_tracked"):
        bn_film_relu(z, g, b, None, rm, rv, momentum=None, **kw)
    assert torch.equal(rm, inp["running_mean"]) and torch.equal(rv, inp["running_var"])


def test_double_backward_is_refused(device, bn_path):
    """Second derivatives (a gradient penalty) are not implemented: create_graph=True is an error naming the op,
    not a silently missing term (before, dz came back without a graph and d(Σ dz² + Σ γ)/dγ was all ones)."""
    inp = make_inputs((3, 5, 4, 3), device, seed=35)
    z, gamma = inp["z"].clone().requires_grad_(), inp["gamma"].clone().requires_grad_()
    out = bn_film_relu(z, gamma, inp["beta"], None, None, None, training=True)
    with pytest.raises(RuntimeError, match="bn_film_relu: impl='triton' has no second derivatives"):
        torch.autograd.grad((out * inp["dout"]).sum(), z, create_graph=True)
    ref = bn_film_relu(z, gamma, inp["beta"], None, None, None, training=True, impl="reference")
    (dz,) = torch.autograd.grad((ref * inp["dout"]).sum(), z, create_graph=True)
    (d_gamma,) = torch.autograd.grad((dz**2).sum() + gamma.sum(), gamma)
    assert not torch.allclose(d_gamma, torch.ones_like(d_gamma)), "the reference has the second-order term"
    (dz_first,) = torch.autograd.grad((out * inp["dout"]).sum(), z)  # first order stays fine
    assert_rel_close(dz_first, dz, FP32_REL, "dz")


def test_strided_running_buffers_are_refused(device):
    """The running buffers are updated in place by the kernel, which assumes stride 1: a strided view (every other
    element of a larger buffer) is refused, not silently half-updated (it used to come out wrong)."""
    inp = make_inputs((3, 5, 4, 3), device, seed=36)
    big_mean, big_var = torch.zeros(10, device=device), torch.ones(10, device=device)
    for impl in ("triton", "reference"):
        with pytest.raises(
            ValueError, match=r"bn_film_relu: running_mean must have stride 1 \(updated in place\)"
        ):
            bn_film_relu(
                inp["z"],
                inp["gamma"],
                inp["beta"],
                None,
                big_mean[::2],
                big_var[:5],
                training=True,
                impl=impl,
            )
        with pytest.raises(
            ValueError, match=r"bn_film_relu: running_var must have stride 1 \(updated in place\)"
        ):
            bn_film_relu(
                inp["z"],
                inp["gamma"],
                inp["beta"],
                None,
                big_mean[:5],
                big_var[::2],
                training=False,
                impl=impl,
            )
    assert torch.equal(big_mean, torch.zeros(10, device=device)) and torch.equal(
        big_var, torch.ones(10, device=device)
    )


def _same_non_finite(
    actual: torch.Tensor, expected: torch.Tensor, name: str, exact_kind: bool = True
) -> None:
    """NaN where the reference has NaN, ±inf where it has ±inf (or, with exact_kind=False, non-finite where the
    reference is non-finite), and the finite rest within FP32_REL."""
    assert torch.equal(actual.isfinite(), expected.isfinite()), f"{name}: non-finite at other places"
    if exact_kind:
        assert torch.equal(actual.isnan(), expected.isnan()), (
            f"{name}: NaN at other places than the reference's"
        )
        assert torch.equal(actual.isposinf(), expected.isposinf()), f"{name}: +inf at other places"
        assert torch.equal(actual.isneginf(), expected.isneginf()), f"{name}: -inf at other places"
    finite = expected.isfinite()
    if finite.any():
        assert_rel_close(actual[finite], expected[finite], FP32_REL, f"{name} (finite part)")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_propagate_as_in_pytorch(device, bn_path, mode):
    """A NaN or inf in z (an fp16 overflow upstream) reaches the output, the gradients and the running statistics
    where PyTorch's ones do; the fused ReLU used a max that drops NaN (PTX max.f32, and np.fmax in the
    interpreter), so a NaN channel came out as 0 and the loss stayed finite: divergence went unseen and a loss
    scaler could not skip the step."""
    inp = make_inputs((3, 5, 4, 3), device, seed=37)
    inp["z"][1, 2, 0, 0] = float("nan")
    inp["z"][2, 3, 1, 1] = float("inf")
    inp["z"][0, 4, 0, 0] = float(
        "-inf"
    )  # the first value of channel 4: the statistics' pivot (must not be used)
    results = []
    for impl in ("triton", "reference"):
        leaves = {k: inp[k].clone().requires_grad_() for k in ("z", "gamma", "beta", "residual")}
        rm, rv = _buffers(inp, mode)
        out = bn_film_relu(*leaves.values(), rm, rv, impl=impl, **_kw(mode))
        out.backward(inp["dout"])
        results.append((out, *(v.grad for v in leaves.values()), rm, rv))
    assert results[1][0].isnan().any(), "the reference output has NaN (else the check is vacuous)"
    names = ("out", "dz", "dgamma", "dbeta", "dresidual", "running_mean", "running_var")
    for name, a, b in zip(names, *results):
        if b is not None:
            # A running mean over an inf and finite values: PyTorch's CPU sum gives ±inf, a running (Welford or
            # Chan) update inf − inf = NaN, as on CUDA; either is non-finite, which is what must not be lost.
            _same_non_finite(a, b, name, exact_kind=not name.startswith("running"))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channel_mean_far_from_zero(device, bn_path, mode):
    """z whose channel means are 1000-2000 standard deviations away from zero (a conv bias that BN cancels): in
    float32 our error against the float64 truth is no worse than PyTorch's float32 reference (2× + 1e-6) and
    within 2·FP32_REL, which PyTorch's own float32 BN is not here (up to 8e-5). Before, the statistics summed z
    itself (the mean 15× further off than its float32 rounding; dz 13× PyTorch's error) and the apply step
    z·scale + (β − mean·scale) cancelled (eval out 3.7e-5); now the statistics are of z − z[0, c, 0] and the
    apply is (z − mean)·scale + β."""
    n, c = 4, 6
    inp = make_inputs((n, c, 5, 5), device, seed=38)
    offset = 1000 * (1 + torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(38))).to(device)
    inp["z"] = (inp["z"] - inp["z"].mean((0, 2, 3), keepdim=True)) / inp["z"].std(
        (0, 2, 3), keepdim=True
    ) + offset
    inp["running_mean"] = offset.flatten() + 0.3 * torch.randn(
        c, generator=torch.Generator().manual_seed(1)
    ).to(device)
    results = {}
    for name, impl, dtype in (("ours", "triton", torch.float32), ("torch", "reference", torch.float32),
                              ("truth", "reference", torch.float64)):  # fmt: skip
        leaves = [inp[k].to(dtype).clone().requires_grad_() for k in ("z", "gamma", "beta", "residual")]
        rm, rv = _buffers(inp, mode, dtype)
        out = bn_film_relu(*leaves, rm, rv, impl=impl, **_kw(mode))
        out.backward(inp["dout"].to(dtype))
        results[name] = [out] + [t.grad for t in leaves]
    for i, what in enumerate(("out", "dz", "dgamma", "dbeta", "dresidual")):
        ours = rel_error(results["ours"][i], results["truth"][i])
        theirs = rel_error(results["torch"][i], results["truth"][i])
        assert ours <= 2 * theirs + 1e-6, f"{what}: ours {ours:.2e} vs PyTorch float32 {theirs:.2e}"
        assert ours <= 2 * FP32_REL, f"{what}: ours {ours:.2e} against the float64 truth"


@pytest.mark.parametrize("z_grad", [True, False], ids=["z_grad", "frozen_network"])
def test_training_backward_skips_dz_when_z_needs_no_gradient(device, bn_path, z_grad):
    """A frozen visual network (train.trainable=generator): z needs no gradient, so the training backward runs
    the reduction only (one pass over dout and z instead of two); the γ, β and residual gradients are unchanged.
    With z's gradient the backward is the reduction, the sums' finalize and the dz pass (split) or the one-launch
    kernel."""
    inp = make_inputs((3, 5, 7, 6), device, seed=39)
    results, launches = [], bn_path.launches
    for impl in ("triton", "reference"):
        leaves = {
            k: inp[k].clone().requires_grad_(k != "z" or z_grad) for k in ("z", "gamma", "beta", "residual")
        }
        rm, rv = _buffers(inp, "train")
        out = bn_film_relu(*leaves.values(), rm, rv, training=True, impl=impl)
        before = dict(launches)
        out.backward(inp["dout"])
        if impl == "triton":  # the backward's launches
            backward = {k: v - before.get(k, 0) for k, v in launches.items() if v > before.get(k, 0)}
        results.append({k: v.grad for k, v in leaves.items()})
    if not z_grad:
        assert backward == {"_backward_reduce_kernel": 1}
    elif bn_path.one_launch:
        assert backward == {"_one_launch_backward_kernel": 1}
    else:
        assert backward == {
            "_backward_reduce_kernel": 1,
            "_finalize_sums_kernel": 1,
            "_backward_dz_kernel": 1,
        }
    for k in ("gamma", "beta", "residual") + (("z",) if z_grad else ()):
        assert_rel_close(results[0][k], results[1][k], FP32_REL, f"d{k}")
    assert z_grad or results[0]["z"] is None
