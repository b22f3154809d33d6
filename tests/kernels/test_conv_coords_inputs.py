"""conv_coords on the inputs a real model or user hands it: float16 (plain and autocast), mixed dtypes, float64,
views, partial requires_grad, odd incoming gradients, degenerate shapes, bad arguments. Each case is compared
with the concatenating plain-PyTorch reference (output, dx, dW with its coordinate columns, db)."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import conv_coords
from tests.kernels.helpers import BF16_REL, FP16_REL, FP32_REL, assert_rel_close, rel_error
from tests.kernels.test_conv_coords import check_against_reference, make_inputs, run

conv_module = importlib.import_module("kernels.conv_coords")


@pytest.mark.parametrize("shape", [(3, 5, 7, 7, 6), (2, 20, 18, 3, 6)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_float16(device, shape, relu):
    """float16 x, weight and bias without autocast: float16 products, float32 accumulation, within FP16_REL."""
    check_against_reference(make_inputs(*shape, 1, device, torch.float16, seed=20), 0, relu)


@pytest.mark.parametrize(
    "dtype, rel", [(torch.float16, FP16_REL), (torch.bfloat16, BF16_REL)], ids=["fp16", "bf16"]
)
@pytest.mark.parametrize("x_dtype", ["fp32", "low"], ids=["x_fp32", "x_low"])
def test_autocast_mixed_dtypes(device, dtype, rel, x_dtype):
    """Under autocast (fp16 and bf16) with float32 weight and bias, x either float32 (the first layer) or already
    in the autocast dtype (a previous layer's output): output in the autocast dtype as F.conv2d's, dx in x's
    dtype, dW and db in float32; values as close to the float32 truth as PyTorch's own autocast conv (2× + 1e-3)."""
    inp = make_inputs(3, 5, 7, 7, 6, 1, device, torch.float32, seed=21)
    if x_dtype == "low":
        inp["x"] = inp["x"].to(dtype)
    with torch.autocast(device, dtype=dtype):
        out, grads = run("triton", inp, 0, True)
        amp_out, amp_grads = run("reference", inp, 0, True)
    truth_out, truth_grads = run("reference", inp, 0, True, upcast=True)
    assert out.dtype == amp_out.dtype == dtype
    assert_rel_close(out, truth_out, rel, "out")
    assert rel_error(out, truth_out) <= 2 * rel_error(amp_out, truth_out) + 1e-3
    for name in ("x", "weight", "bias"):
        assert grads[name].dtype == inp[name].dtype, f"d{name} dtype"
        assert_rel_close(grads[name], truth_grads[name], rel, f"d{name}")
        assert (
            rel_error(grads[name], truth_grads[name])
            <= 2 * rel_error(amp_grads[name], truth_grads[name]) + 1e-3
        )


@pytest.mark.parametrize("k", [1, 3])
def test_float64_equals_float64_reference(device, k):
    """float64 (what gradcheck uses): the kernels multiply and accumulate in float64, so they agree with the
    float64 reference to ~1e-12 on a shape that is no multiple of any block."""
    inp = make_inputs(3, 5, 7, 7, 6, k, device, torch.float64, seed=22)
    gen = torch.Generator().manual_seed(22)
    for name in ("x", "weight", "bias"):  # bits below float32's: products rounded to float32 would show
        noise = torch.rand(inp[name].shape, generator=gen, dtype=torch.float64).to(device)
        inp[name] = inp[name] * (1 + 1e-4 * noise)
    out, grads = run("triton", inp, k // 2, True)
    ref_out, ref_grads = run("reference", inp, k // 2, True)
    assert out.dtype == torch.float64
    assert_rel_close(out, ref_out, 1e-12, "out")
    for name in ("x", "weight", "bias"):
        assert grads[name].dtype == torch.float64
        assert_rel_close(grads[name], ref_grads[name], 1e-12, f"d{name}")


@pytest.mark.parametrize(
    "needs",
    [("x",), ("weight",), ("bias",), ("weight", "bias"), ("x", "bias"), ()],
    ids=lambda s: "+".join(s) or "none",
)
def test_only_some_inputs_require_grad(device, needs):
    """A frozen layer (only x needs grad), a frozen input (only the parameters), only the bias, nothing (inference):
    the requested gradients match the reference and the others stay None."""
    inp = make_inputs(3, 5, 7, 7, 6, 1, device, seed=23)
    results = []
    for impl in ("triton", "reference"):
        leaves = {k: inp[k].clone().requires_grad_(k in needs) for k in ("x", "weight", "bias")}
        out = conv_coords(*leaves.values(), padding=0, relu=True, impl=impl)
        assert out.requires_grad == bool(needs)
        if needs:
            out.backward(inp["dout"])
        results.append((out, {k: v.grad for k, v in leaves.items()}))
    (out, grads), (ref_out, ref_grads) = results
    assert_rel_close(out, ref_out, FP32_REL, "out")
    for k in grads:
        if k in needs:
            assert_rel_close(grads[k], ref_grads[k], FP32_REL, f"d{k}")
        else:
            assert grads[k] is None, f"d{k} should be None"


def test_without_bias(device):
    """bias=None (a conv without bias): no bias term, no bias gradient."""
    inp = make_inputs(3, 5, 7, 7, 6, 1, device, seed=24)
    results = []
    for impl in ("triton", "reference"):
        x, weight = (inp[k].clone().requires_grad_() for k in ("x", "weight"))
        out = conv_coords(x, weight, None, padding=0, relu=True, impl=impl)
        out.backward(inp["dout"])
        results.append((out, x.grad, weight.grad))
    for name, a, b in zip(("out", "dx", "dW"), *results):
        assert_rel_close(a, b, FP32_REL, name)


def test_strided_views(device):
    """x a channel slice of a wider tensor (storage offset), x with batch and channel axes swapped in memory, a
    weight sliced out of a wider one (input stride ≠ C_in + 2), x expanded over the batch: read through strides,
    no copy."""
    n, c_in, c_out, h, w = 3, 5, 7, 4, 6
    inp = make_inputs(n, c_in, c_out, h, w, 1, device, seed=25)
    wide = torch.randn(n, c_in + 4, h, w, device=device)
    wide[:, 3 : 3 + c_in] = inp["x"]
    inp["x"] = wide[:, 3 : 3 + c_in]
    assert not inp["x"].is_contiguous() and inp["x"].storage_offset() > 0
    check_against_reference(inp, 0, True)
    inp["x"] = inp["x"].transpose(0, 1).contiguous().transpose(0, 1)
    w_wide = torch.randn(c_out, c_in + 5, 1, 1, device=device)
    w_wide[:, 1 : c_in + 3] = inp["weight"]
    inp["weight"] = w_wide[:, 1 : c_in + 3]
    assert inp["weight"].stride(0) == c_in + 5
    check_against_reference(inp, 0, False)
    inp["x"] = inp["x"][:1].expand(n, c_in, h, w)  # one image for every question (stride 0 over the batch)
    assert inp["x"].stride(0) == 0
    check_against_reference(inp, 0, True)


DOUT_LAYOUTS = {
    "per_channel": lambda d: d[:1, :, :1, :1].expand_as(d),  # zero strides on N, H, W
    "batch_broadcast": lambda d: d[:1].expand_as(d),  # zero stride on N only
    "channels_last": lambda d: d.contiguous(memory_format=torch.channels_last),  # while x is NCHW
    "hw_transposed": lambda d: d.transpose(2, 3).contiguous().transpose(2, 3),  # not flattenable: copied
}


# A per-channel constant gradient through a linear conv makes dW's coordinate columns Σ_p g·cx(p) = 0 exactly
# (the coordinates sum to zero): the reference would hold rounding noise, so that pair is left out.
@pytest.mark.parametrize(
    "layout, relu",
    [(k, r) for k in DOUT_LAYOUTS for r in (True, False) if (k, r) != ("per_channel", False)],
    ids=lambda v: v if isinstance(v, str) else ("relu" if v else "linear"),
)
def test_grad_output_layouts(device, layout, relu):
    """The incoming gradient in another layout than the output's, read through its strides (or copied)."""
    inp = make_inputs(3, 5, 7, 7, 6, 1, device, seed=26)
    inp["dout"] = DOUT_LAYOUTS[layout](inp["dout"])
    check_against_reference(inp, 0, relu)


@pytest.mark.parametrize(
    "shape",
    [(1, 5, 7, 4, 6), (4, 5, 7, 1, 1), (3, 1, 6, 4, 5), (3, 5, 1, 4, 5), (1, 1, 1, 1, 1)],
    ids=["batch1", "hw1", "c_in1", "c_out1", "all1"],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_degenerate_shapes(device, shape, layout):
    """Batch 1, 1×1 maps (one coordinate, −1 in both maps), one input or output channel, in both layouts.
    The ReLU is off: with one output value per sample it would be all-zero or all-positive by chance."""
    inp = make_inputs(*shape, 1, device, seed=27)
    if layout == "channels_last":
        inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
        inp["dout"] = inp["dout"].contiguous(memory_format=torch.channels_last)
    check_against_reference(inp, 0, False)


def test_3x3_on_tiny_maps(device):
    """The unfused k > 1 path on 1×1 and 2×1 maps: the padded border is all there is."""
    for h, w in ((1, 1), (2, 1)):
        check_against_reference(make_inputs(2, 3, 4, h, w, 3, device, seed=28), 1, False)


def test_many_samples(device, monkeypatch):
    """A batch of 70 (grid axis 0 = samples × position blocks; 9 weight-gradient splits, the last uneven)."""
    monkeypatch.setattr(conv_module, "CONV_WGRAD_SAMPLES_PER_SPLIT", 8)
    check_against_reference(make_inputs(70, 3, 4, 2, 3, 1, device, seed=29), 0, True)


def test_rejects_bad_arguments_naming_them(device):
    """Wrong dtypes, devices and bias shapes: one clear error naming the argument, never a Triton crash or an
    out-of-bounds read (a bias shorter than C_out used to be read past its end)."""
    inp = make_inputs(2, 4, 6, 5, 6, 1, device, seed=30)
    x, weight, bias = inp["x"], inp["weight"], inp["bias"]
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match=r"conv_coords: bias must be \[C_out\] = \[6\], got \(3,\)"):
            conv_coords(x, weight, bias[:3], padding=0, relu=True, impl=impl)
        with pytest.raises(ValueError, match=r"conv_coords: bias must be \[C_out\] = \[6\], got \(1, 6\)"):
            conv_coords(x, weight, bias[None], padding=0, relu=True, impl=impl)
        with pytest.raises(TypeError, match="conv_coords: x must be a floating-point tensor"):
            conv_coords(x.long(), weight.long(), bias.long(), padding=0, relu=True, impl=impl)
        with pytest.raises(ValueError, match="conv_coords: bias is on meta, x on cpu"):
            conv_coords(x.cpu(), weight.cpu(), bias.to("meta"), padding=0, relu=True, impl=impl)
        with pytest.raises(ValueError, match="conv_coords: weight is on meta, x on cpu"):
            conv_coords(x.cpu(), weight.to("meta"), bias.cpu(), padding=0, relu=True, impl=impl)


def test_double_backward_is_refused(device):
    """Second derivatives are not implemented by the fused 1×1 conv: create_graph=True is an error naming the op,
    not a silently missing term."""
    inp = make_inputs(2, 4, 6, 5, 6, 1, device, seed=31)
    x, weight = inp["x"].clone().requires_grad_(), inp["weight"].clone().requires_grad_()
    out = conv_coords(x, weight, inp["bias"], padding=0, relu=False)
    with pytest.raises(RuntimeError, match="conv_coords: impl='triton' has no second derivatives"):
        torch.autograd.grad((out * inp["dout"]).sum(), x, create_graph=True)
    (dx,) = torch.autograd.grad((out * inp["dout"]).sum(), x)  # first order stays fine
    assert dx.shape == x.shape and not dx.requires_grad


@pytest.mark.parametrize("k, padding", [(3, 0), (1, 1), (3, 2), (5, 2)], ids=lambda v: str(v))
def test_other_kernel_sizes_and_paddings(device, k, padding):
    """The unfused path (k > 1 or padding > 0): any kernel size with any zero padding, the bias map carrying the
    border effect (a smaller 'valid' output, a larger over-padded one)."""
    inp = make_inputs(2, 4, 5, 6, 5, k, device, seed=32)
    h_out, w_out = 6 + 2 * padding - k + 1, 5 + 2 * padding - k + 1
    inp["dout"] = torch.randn(2, 5, h_out, w_out, generator=torch.Generator().manual_seed(32)).to(device)
    out, _ = check_against_reference(inp, padding, False)
    assert out.shape == (2, 5, h_out, w_out)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_nan_and_inf_propagate_as_in_pytorch(device, relu):
    """NaN and inf in x reach the output and every gradient where PyTorch's conv + relu put them; the fused ReLU
    used a max that drops NaN (PTX max.f32; np.fmax in the interpreter), so NaN came out as 0."""
    inp = make_inputs(2, 4, 6, 5, 6, 1, device, seed=33)
    inp["x"][0, 1, 2, 3] = float("nan")
    inp["x"][1, 2, 0, 0] = float("inf")
    results = []
    for impl in ("triton", "reference"):
        leaves = {k: inp[k].clone().requires_grad_() for k in ("x", "weight", "bias")}
        out = conv_coords(*leaves.values(), padding=0, relu=relu, impl=impl)
        out.backward(inp["dout"])
        results.append((out, *(v.grad for v in leaves.values())))
    assert results[1][0].isnan().any(), "the reference output has NaN (else the check is vacuous)"
    for name, a, b in zip(("out", "dx", "dW", "db"), *results):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at other places than the reference's"
        assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), name
        finite = b.isfinite()
        if finite.any():
            assert_rel_close(a[finite], b[finite], FP32_REL, f"{name} (finite part)")
