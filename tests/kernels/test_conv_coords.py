"""conv_coords, coord_map, coord_bias_map: the fused coordinate conv against the concatenating reference."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels._common as common
from kernels import conv_coords, coord_bias_map, coord_map
from tests.kernels.helpers import (
    BF16_REL,
    FP32_REL,
    TF32_REL,
    assert_rel_close,
    clone_layout,
    cuda_only,
    rel_error,
    tol,
)

conv_module = importlib.import_module("kernels.conv_coords")  # the package exports a function of that name

# (N, C_in, C_out, H, W): H ≠ W catches an x/y swap; 14×14 = 196 positions and 130 augmented input columns are
# not multiples of the blocks; 1×5 and 5×1 exercise linspace with one step (a single coordinate: −1).
SHAPES_1X1 = [(3, 5, 7, 7, 6), (2, 128, 128, 14, 14)]


def make_inputs(n, c_in, c_out, h, w, k, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen)
    weight = torch.randn(c_out, c_in + 2, k, k, generator=gen) / (c_in + 2) ** 0.5 / k
    weight[:, c_in:] *= 4  # make the coordinate columns matter as much as ~16 input channels
    bias = 0.5 * torch.randn(c_out, generator=gen)
    h_out, w_out = h + 2 * (k // 2) - k + 1, w + 2 * (k // 2) - k + 1
    dout = torch.randn(n, c_out, h_out, w_out, generator=gen)
    return {k_: v.to(device, dtype) for k_, v in dict(x=x, weight=weight, bias=bias, dout=dout).items()}


def run(impl, inp, padding, relu, upcast=False):
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    leaves = {k: clone_layout(cast(inp[k])).requires_grad_() for k in ("x", "weight", "bias")}
    out = conv_coords(leaves["x"], leaves["weight"], leaves["bias"], padding=padding, relu=relu, impl=impl)
    out.backward(cast(inp["dout"]))
    return out, {k: v.grad for k, v in leaves.items()}


def check_against_reference(inp, padding, relu):
    """Triton vs the float32 reference from the same (possibly bf16) inputs: output and dx, dW (all columns), db."""
    out, grads = run("triton", inp, padding, relu)
    ref_out, ref_grads = run("reference", inp, padding, relu, upcast=True)
    assert out.dtype == inp["x"].dtype
    assert_rel_close(out, ref_out, tol(out.dtype), "out")
    if relu:
        assert (ref_out == 0).any() and (ref_out > 0).any()
    c_in = inp["x"].shape[1]
    for name in ("x", "weight", "bias"):
        assert grads[name].dtype == inp[name].dtype, f"d{name} dtype"
        assert_rel_close(grads[name], ref_grads[name], tol(grads[name].dtype), f"d{name}")
    assert_rel_close(
        grads["weight"][:, c_in:], ref_grads["weight"][:, c_in:], tol(inp["weight"].dtype), "dW_coords"
    )
    return out, grads


@pytest.mark.parametrize(
    "shape", SHAPES_1X1 + [(2, 4, 6, 1, 5), (2, 4, 6, 5, 1)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_1x1_matches_reference(device, shape, dtype, relu):
    check_against_reference(make_inputs(*shape, 1, device, dtype), 0, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_1x1_many_tiles_and_batch_splits(device, monkeypatch, dtype):
    """16-wide blocks (under the interpreter) and 2 samples per weight-gradient split: several K iterations with a
    partial last tile in every GEMM dimension, and the sum over an uneven number of splits."""
    monkeypatch.setitem(common.GEMM_INTERPRET_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(common.GEMM_INTERPRET_CONFIG, "BLOCK_N", 16)
    monkeypatch.setitem(common.GEMM_INTERPRET_CONFIG, "BLOCK_K", 16)
    monkeypatch.setattr(conv_module, "CONV_WGRAD_SAMPLES_PER_SPLIT", 2)
    check_against_reference(make_inputs(5, 20, 18, 3, 6, 1, device, dtype, seed=8), 0, True)


GPU_CONFIG_INDICES = [
    (family, i)
    for family in ("mma", "fma")
    for i in range(max(len(lists[family]) for lists in common.GEMM_GPU_CONFIGS.values()))
]


@pytest.mark.parametrize("family, index", GPU_CONFIG_INDICES, ids=str)
def test_1x1_gpu_autotune_configs(device, monkeypatch, family, index):
    """Autotune config `index` of a family of each GEMM (forward, dx, dW; a shorter list wraps around) with exactly
    its blocks and the GPU's batch split: the tile logic a GPU gets, on a shape a little larger than those blocks
    in every GEMM dimension (partial last tiles everywhere; 3 samples) with H·W a multiple of 4, so that the
    VEC = 4 alignment hints are used (NCHW). The family only picks the blocks (the interpreter computes in float32)."""
    lists = {kind: families[family] for kind, families in common.GEMM_GPU_CONFIGS.items()}
    blocks = {kind: configs[index % len(configs)][:3] for kind, configs in lists.items()}
    (fm, fn, fk), (xm, xn, xk), (wm, wn, wk) = blocks["forward"], blocks["dx"], blocks["dw"]
    c_out, c_in, hw = max(fm, xk, wm) + 4, max(fk, xm, wn) + 8, max(fn, xn, wk) + 4
    if device == "cpu":
        for kind, (bm, bn, bk) in blocks.items():
            monkeypatch.setitem(
                common.GEMM_INTERPRET_EXACT, kind, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
            )
    monkeypatch.setattr(conv_module, "CONV_WGRAD_SAMPLES_PER_SPLIT", None)  # as many splits as fill 132 SMs
    assert conv_module._wgrad_samples_per_split(3, c_in, c_out, torch.device(device)) == 1
    check_against_reference(make_inputs(3, c_in, c_out, 4, hw // 4, 1, device, seed=10), 0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_1x1_channels_last(device, dtype):
    """x in channels_last: read through strides; the output and dx come back in channels_last."""
    inp = make_inputs(2, 128, 128, 14, 14, 1, device, dtype, seed=1)
    inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
    inp["dout"] = inp["dout"].contiguous(memory_format=torch.channels_last)
    out, grads = check_against_reference(inp, 0, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert grads["x"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_3x3_padded_matches_reference(device, dtype, relu):
    """k > 1 (the feature stem): the bias map must carry zero padding's border effect."""
    check_against_reference(make_inputs(2, 9, 6, 5, 6, 3, device, dtype, seed=2), 1, relu)


@pytest.mark.parametrize("h, w", [(4, 7), (1, 5), (5, 1), (14, 14)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_coordinates_are_linspace(device, h, w, dtype):
    """Zero input, identity coordinate columns, no bias: the 1×1 kernel's output is the coordinate maps, exactly."""
    x = torch.zeros(2, 3, h, w, device=device, dtype=dtype)
    weight = torch.zeros(2, 5, 1, 1, device=device, dtype=dtype)
    weight[0, 3] = weight[1, 4] = 1
    out = conv_coords(x, weight, None, padding=0, relu=False)
    expected = coord_map(h, w, device, dtype)
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)


def test_tf32_follows_torch():
    """float32 GEMMs use TF32 exactly when torch's float32 matmuls may (the autouse fixture restores the setting)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    assert conv_module._precision(torch.float32) == "tf32"
    assert conv_module._precision(torch.bfloat16) == "ieee"  # bf16 operands are exact in any mode
    torch.set_float32_matmul_precision("highest")
    assert conv_module._precision(torch.float32) == "ieee"
    torch.set_float32_matmul_precision("high")
    assert conv_module._precision(torch.float32) == "tf32"
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's switch is not the one
    torch.backends.cuda.matmul.allow_tf32 = False
    assert conv_module._precision(torch.float32) == "ieee"


def test_coord_map_is_the_original():
    """Channel 0 is x (varies along the width), channel 1 is y; both linspace(−1, 1) with the end points."""
    m = coord_map(3, 4)
    assert m.shape == (2, 3, 4)
    assert torch.equal(m[0], torch.linspace(-1, 1, 4).expand(3, 4))
    assert torch.equal(m[1], torch.linspace(-1, 1, 3)[:, None].expand(3, 4))
    assert m[0, 0, 0] == -1 and m[0, 0, -1] == 1 and m[1, -1, 0] == 1


@pytest.mark.parametrize("k, padding", [(1, 0), (3, 1), (3, 0)])
def test_coord_bias_map(device, k, padding):
    """Equals the conv of the coordinate maps (border included) and is differentiable in the weights: its weight
    gradient for a random upstream gradient equals autograd's through F.conv2d(coord_map). (`bmap.sum()` would be
    degenerate: for a 1×1 kernel its gradient is the sum of a symmetric linspace, exactly 0 — cuDNN gets the 0,
    the CPU passed on rounding noise.)"""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(4, 2, k, k, generator=gen).to(device)
    w_coords = w.clone().requires_grad_()
    bmap = coord_bias_map(w_coords, 5, 6, padding)
    w_ref = w.clone().requires_grad_()
    expected = F.conv2d(coord_map(5, 6, device)[None], w_ref, padding=padding)[0]
    assert_rel_close(bmap, expected, FP32_REL, "bias map")
    if padding:
        assert not torch.allclose(bmap[:, 0, 1:-1], bmap[:, 1, 1:-1])  # the border differs
    upstream = torch.randn(tuple(bmap.shape), generator=gen).to(device)
    bmap.backward(upstream)
    expected.backward(upstream)
    assert_rel_close(w_coords.grad, w_ref.grad, FP32_REL, "d w_coords")


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_float64(device, relu, k):
    """Finite differences in float64 on a tiny shape: x, weight (coordinate columns included) and bias."""
    inp = make_inputs(1, 2, 2, 2, 3, k, device, torch.float64, seed=3)

    def fn(x, weight, bias):
        return conv_coords(x, weight, bias, padding=k // 2, relu=relu)

    args = tuple(inp[name].detach().requires_grad_() for name in ("x", "weight", "bias"))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_autocast(device, relu):
    """Under bf16 autocast with float32 x and weights: bf16 output (as F.conv2d), float32 gradients, close values."""
    inp = make_inputs(3, 5, 7, 7, 6, 1, device, torch.float32, seed=4)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, grads = run("triton", inp, 0, relu)
        amp_out, amp_grads = run("reference", inp, 0, relu)
    ref_out, ref_grads = run("reference", inp, 0, relu)
    assert out.dtype == amp_out.dtype == torch.bfloat16
    assert_rel_close(out, ref_out, BF16_REL, "out")
    assert rel_error(out, ref_out) <= 2 * rel_error(amp_out, ref_out) + 1e-3
    for name in ("x", "weight", "bias"):
        assert grads[name].dtype == torch.float32
        # bf16 operands (x, W, G rounded once each), float32 accumulation
        assert_rel_close(grads[name], ref_grads[name], BF16_REL, f"d{name}")
        assert (
            rel_error(grads[name], ref_grads[name]) <= 2 * rel_error(amp_grads[name], ref_grads[name]) + 1e-3
        )


def test_compile_matches_reference(device):
    inp = make_inputs(3, 5, 7, 7, 6, 1, device, seed=5)
    out, grads = run("compile", inp, 0, True)
    ref_out, ref_grads = run("reference", inp, 0, True)
    assert_rel_close(out, ref_out, FP32_REL, "out")
    for name in ("x", "weight", "bias"):
        assert_rel_close(grads[name], ref_grads[name], FP32_REL, f"d{name}")


def test_rejects_bad_inputs(device):
    inp = make_inputs(2, 4, 6, 5, 6, 1, device)
    x, weight, bias = inp["x"], inp["weight"], inp["bias"]
    with pytest.raises(ValueError, match="C_in \\+ 2"):
        conv_coords(x, weight[:, :5], bias, padding=0, relu=True)
    with pytest.raises(TypeError, match="autocast is off"):
        conv_coords(x.double(), weight, bias, padding=0, relu=True)
    with pytest.raises(ValueError, match="flattenable"):
        conv_coords(x.transpose(2, 3), weight, bias, padding=0, relu=True)
    with pytest.raises(ValueError, match="impl"):
        conv_coords(x, weight, bias, padding=0, relu=True, impl="cudnn")


@cuda_only
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("c_out, relu", [(128, True), (512, False)], ids=["resblock", "classifier"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_size_on_gpu(device, layout, c_out, relu, dtype):
    """The model's 1×1 projections at batch 64, 14×14, compiled and autotuned."""
    inp = make_inputs(64, 128, c_out, 14, 14, 1, device, dtype, seed=6)
    if layout == "channels_last":
        inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
        inp["dout"] = inp["dout"].contiguous(memory_format=torch.channels_last)
    check_against_reference(inp, 0, relu)


@cuda_only
@pytest.mark.parametrize("c_out, relu", [(128, True), (512, False)], ids=["resblock", "classifier"])
def test_model_size_tf32_on_gpu(device, c_out, relu):
    """float32 with TF32 allowed (torch's switch), compiled and autotuned, at the model's sizes."""
    check_tf32_against_reference(make_inputs(64, 128, c_out, 14, 14, 1, device, torch.float32, seed=6), relu)


def check_tf32_against_reference(inp, relu):
    """TF32 products against the IEEE float32 reference. The output within TF32_REL; the gradients against the
    reference's backward *through the kernel's own ReLU mask*: outputs within TF32 error of 0 may fall on the
    other side of the ReLU than in IEEE arithmetic, and one such flip moves that element's whole gradient (seen on
    the H200: 205 flips, dx 0.20 off, against an IEEE mask). Every flip must lie within TF32 error of 0."""
    torch.backends.cuda.matmul.allow_tf32 = True
    out, grads = run("triton", inp, 0, relu)
    torch.backends.cuda.matmul.allow_tf32 = False
    leaves = {k: clone_layout(inp[k]).requires_grad_() for k in ("x", "weight", "bias")}
    pre = conv_coords(leaves["x"], leaves["weight"], leaves["bias"], padding=0, relu=False, impl="reference")
    assert_rel_close(out, F.relu(pre) if relu else pre, TF32_REL, "out")
    upstream = inp["dout"]
    if relu:
        flips = (out > 0) != (pre > 0)
        near_zero = pre.detach().abs() <= TF32_REL * pre.detach().abs().max()
        assert bool((near_zero | ~flips).all()), "a ReLU flip away from 0: not a rounding difference"
        upstream = inp["dout"] * (out > 0)  # the kernel's own mask
    pre.backward(upstream)
    for name in ("x", "weight", "bias"):
        assert_rel_close(grads[name], leaves[name].grad, TF32_REL, f"d{name}")
    return int(flips.sum()) if relu else 0


@pytest.mark.parametrize("c_out, relu", [(128, True), (40, False)], ids=["relu", "linear"])
def test_tf32(device, c_out, relu):
    """TF32 on any device: under the interpreter tests/kernels/gpu_emulation.py truncates the operands as the
    tensor cores do. With ReLU this input flips 4 outputs near 0 on the CPU (a comparison through the IEEE mask
    fails there with dx 9.7e-2 off, as it did on the H200), so the kernel's-own-mask path is exercised."""
    inp = make_inputs(4, 96, c_out, 6, 7, 1, device, torch.float32, seed=12)
    flips = check_tf32_against_reference(inp, relu)
    assert flips > 0 or not relu or device != "cpu"


@cuda_only
def test_feature_stem_on_gpu(device):
    """The feature stem's 3×3 conv (1024 + 2 → 128, padding 1) at batch 16 in bf16."""
    check_against_reference(make_inputs(16, 1024, 128, 14, 14, 3, device, torch.bfloat16, seed=7), 1, False)
