"""bn_film_relu: the Triton kernels against the plain-PyTorch reference (outputs, every gradient, running stats)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import bn_film_relu
from tests.kernels.helpers import (
    BF16_REL,
    FP32_REL,
    assert_rel_close,
    clone_layout,
    cuda_only,
    rel_error,
    tol,
)

bn_module = importlib.import_module("kernels.bn_film_relu")  # the package exports a function of that name
common = importlib.import_module("kernels._common")

# Not multiples of any block size: odd channel counts, 7×7 and 14×14 positions (196 = 256 − 60).
SHAPES = [(3, 5, 7, 7), (2, 130, 14, 14)]
MODES = ["train", "eval", "no_bn"]


def make_inputs(shape, device, dtype=torch.float32, gamma_dtype=None, seed=0):
    """z with per-channel offset and spread (a conv output with bias), FiLM (γ around 1), residual, buffers, dout."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen)

    z = randn(shape) * (0.5 + randn(1, c, 1, 1).abs()) + randn(1, c, 1, 1)
    gamma = 1 + 0.5 * randn(n, c)
    beta = 0.5 * randn(n, c)
    residual = randn(shape)
    running_mean = 0.2 * randn(c)
    running_var = 0.5 + torch.rand(c, generator=gen)
    dout = randn(shape)
    gd = gamma_dtype or dtype
    return dict(
        z=z.to(device, dtype),
        gamma=gamma.to(device, gd),
        beta=beta.to(device, gd),
        residual=residual.to(device, dtype),
        running_mean=running_mean.to(device),
        running_var=running_var.to(device),
        dout=dout.to(device, dtype),
    )


def run(impl, inp, mode, residual=True, buffers=True, upcast=False, **kw):
    """Forward + backward of one implementation on fresh leaves; returns (out, grads dict, mean buffer, var buffer)."""
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    leaves = {k: clone_layout(cast(inp[k])).requires_grad_() for k in ("z", "gamma", "beta", "residual")}
    if not residual:
        leaves["residual"] = None
    use_buffers = buffers and mode != "no_bn"
    rm = inp["running_mean"].clone() if use_buffers else None
    rv = inp["running_var"].clone() if use_buffers else None
    out = bn_film_relu(
        leaves["z"], leaves["gamma"], leaves["beta"], leaves["residual"], rm, rv,
        training=mode == "train", normalize=mode != "no_bn", impl=impl, **kw,
    )  # fmt: skip
    out.backward(cast(inp["dout"]))
    grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
    return out, grads, rm, rv


def check_against_reference(inp, mode, residual=True, buffers=True, **kw):
    """Triton vs the float32 reference computed from the same (possibly bf16) inputs."""
    dtype = inp["z"].dtype
    out, grads, rm, rv = run("triton", inp, mode, residual, buffers, **kw)
    ref_out, ref_grads, ref_rm, ref_rv = run("reference", inp, mode, residual, buffers, upcast=True, **kw)
    assert out.dtype == dtype
    assert_rel_close(out, ref_out, tol(dtype), "out")
    for name in ("z", "gamma", "beta") + (("residual",) if residual else ()):
        assert grads[name].dtype == inp[name].dtype, f"d{name} dtype"
        assert_rel_close(grads[name], ref_grads[name], tol(grads[name].dtype), f"d{name}")
    if rm is not None:
        assert_rel_close(rm, ref_rm, FP32_REL, "running_mean")
        assert_rel_close(rv, ref_rv, FP32_REL, "running_var")
        if mode == "train":
            assert not torch.equal(rm, inp["running_mean"]) and not torch.equal(rv, inp["running_var"])
        else:
            assert torch.equal(rm, inp["running_mean"]) and torch.equal(rv, inp["running_var"])
    return out, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_matches_reference(device, bn_path, shape, dtype, mode, residual):
    check_against_reference(make_inputs(shape, device, dtype), mode, residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("residual_layout", ["channels_last", "nchw"])
def test_channels_last(device, bn_path, dtype, mode, residual_layout):
    """z (and the residual) in channels_last: read through strides, output and dz come back in channels_last."""
    inp = make_inputs((2, 130, 14, 14), device, dtype, seed=1)
    inp["z"] = inp["z"].contiguous(memory_format=torch.channels_last)
    inp["dout"] = inp["dout"].contiguous(memory_format=torch.channels_last)
    if residual_layout == "channels_last":
        inp["residual"] = inp["residual"].contiguous(memory_format=torch.channels_last)
    out, grads = check_against_reference(inp, mode)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert grads["z"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_many_tiles_and_batch_splits(device, bn_path, monkeypatch, layout, mode):
    """Tiny tiles, splits of 2 samples × one position tile: several tiles per sample (the in-split Chan combine,
    the `first` program writing eval's statistics), several channel blocks, an uneven last group of samples and
    a partial last chunk of positions (the finalize kernels' sums over chunks). One launch: tiles of 1 sample ×
    16 (NCHW) or 8 (channels_last) positions, 2 or 3 per sample, the last partial; then of 4 or 2 samples × 32
    positions (an uneven last block of samples); each pass over several tiles."""
    cl = layout == "channels_last"
    monkeypatch.setattr(bn_module, "BN_TILE", 16)
    monkeypatch.setattr(common, "BN_SPLIT", (2, 1))
    monkeypatch.setattr(bn_module, "BN_ONE_LAUNCH_TILE", 16)
    block_c, block_p = bn_module._tile(3, 20, cl)
    assert (block_c, block_p) == ((4, 4) if cl else (1, 16))
    assert bn_module._split_plan(5, 3, 20, block_c, block_p, torch.device(device)) == (
        (2, 4, 5, 15) if cl else (2, 16, 2, 6)
    )
    assert bn_module._one_launch_tile(5, 20, cl) == ((1, 8) if cl else (1, 16))
    inp = make_inputs((5, 3, 4, 5), device, seed=9)
    if layout == "channels_last":
        for k in ("z", "residual", "dout"):
            inp[k] = inp[k].contiguous(memory_format=torch.channels_last)
    check_against_reference(inp, mode)
    if bn_path.one_launch:
        monkeypatch.setattr(bn_module, "BN_ONE_LAUNCH_TILE", 128)
        assert bn_module._one_launch_tile(5, 20, cl) == ((2, 32) if cl else (4, 32))
        check_against_reference(inp, mode)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_tiles(device, bn_path, monkeypatch, layout, mode):
    """The GPU's launch settings (2048-element tiles, splits for 8 programs per SM of 132; 4096-element
    one-launch tiles) in the interpreter: 12×11 = 132 positions (VEC = 4 alignment hints in NCHW; three
    64-position tiles in channels_last), 20 channels (three 8-channel blocks in NCHW), 9 samples: 3 splits of 3
    samples (NCHW), one split per sample (channels_last); in training also splits of 2 samples (the last of 1) ×
    chunks of 2 of the 3 tiles."""
    monkeypatch.setattr(bn_module, "BN_TILE", 2048)
    monkeypatch.setattr(bn_module, "BN_SPLIT_PROGRAMS_PER_SM", 8)
    monkeypatch.setattr(bn_module, "BN_ONE_LAUNCH_TILE", 4096)
    cl = layout == "channels_last"
    plan = bn_module._split_plan(9, 20, 132, *bn_module._tile(20, 132, cl), torch.device("cpu"))
    assert plan == ((1, 192, 1, 9) if cl else (3, 256, 1, 3))
    inp = make_inputs((9, 20, 12, 11), device, seed=11)
    if layout == "channels_last":
        for k in ("z", "residual", "dout"):
            inp[k] = inp[k].contiguous(memory_format=torch.channels_last)
    assert bn_module._tile(20, 132, layout == "channels_last") == (
        (32, 64) if layout == "channels_last" else (8, 256)
    )
    # one launch: one block of 16 samples, 9 used (NCHW); two blocks of 8, 1 used in the second (channels_last)
    assert bn_module._one_launch_tile(9, 132, layout == "channels_last") == (
        (8, 256) if layout == "channels_last" else (16, 256)
    )
    check_against_reference(inp, mode)
    if mode == "train":
        monkeypatch.setattr(common, "BN_SPLIT", (2, 2))
        plan = bn_module._split_plan(9, 20, 132, *bn_module._tile(20, 132, cl), torch.device("cpu"))
        assert plan == ((2, 128, 2, 10) if cl else (2, 256, 1, 5))
        check_against_reference(inp, mode)


def test_train_without_buffers(device, bn_path):
    """training with running_mean = running_var = None: batch statistics, nothing to update."""
    check_against_reference(make_inputs((3, 5, 7, 7), device), "train", buffers=False)


@pytest.mark.parametrize("mode", MODES)
def test_film_params_in_another_dtype_and_strided(device, bn_path, mode):
    """bf16 activations with float32 γ/β sliced out of a generator output [N, blocks, 2C] (as the model does)."""
    n, c = 3, 5
    inp = make_inputs((n, c, 7, 7), device, torch.bfloat16, gamma_dtype=torch.float32, seed=2)
    film = torch.randn(n, 4, 2 * c, device=device)
    film[:, 1, :c], film[:, 1, c:] = inp["gamma"], inp["beta"]
    inp["gamma"], inp["beta"] = film[:, 1, :c], film[:, 1, c:]
    assert not inp["gamma"].is_contiguous()
    check_against_reference(inp, mode)


def test_float32_activations_with_bf16_film_params(device, bn_path):
    inp = make_inputs((3, 5, 7, 7), device, torch.float32, gamma_dtype=torch.bfloat16, seed=3)
    check_against_reference(inp, "train")


def test_running_stats_follow_batchnorm2d(device, bn_path):
    """Three training steps and an eval step against nn.BatchNorm2d(affine=False), non-default momentum and eps."""
    n, c, h, w = 4, 6, 5, 3
    bn = nn.BatchNorm2d(c, affine=False, momentum=0.3, eps=1e-3).to(device)
    running_mean = torch.zeros(c, device=device)
    running_var = torch.ones(c, device=device)
    ones, zeros = torch.ones(n, c, device=device), torch.zeros(n, c, device=device)
    for step in range(4):
        training = step < 3
        bn.train(training)
        z = torch.randn(n, c, h, w, device=device) * (step + 1) + step
        out = bn_film_relu(
            z, ones, zeros, None, running_mean, running_var, training=training, momentum=0.3, eps=1e-3
        )
        assert_rel_close(out, F.relu(bn(z)), FP32_REL, f"out (step {step})")
        assert_rel_close(running_mean, bn.running_mean, FP32_REL, f"running_mean (step {step})")
        assert_rel_close(running_var, bn.running_var, FP32_REL, f"running_var (step {step})")


@pytest.mark.parametrize("mode", MODES)
def test_bf16_error_comparable_to_pytorch_bf16(device, bn_path, mode):
    """Against the float32 result, our bf16 error is within BF16_REL and no worse than PyTorch's own bf16 path.

    PyTorch in bf16 rounds after every op (BN, ×γ, +β, ReLU, +r); we compute in float32 and round once, so our
    error should not exceed the reference-in-bf16's (up to 2× + 1e-3, for rounding luck on a single tensor).
    """
    inp = make_inputs((2, 130, 14, 14), device, torch.bfloat16, seed=4)
    exact_out, exact_grads, _, _ = run("reference", inp, mode, upcast=True)
    ours_out, ours_grads, _, _ = run("triton", inp, mode)
    torch_out, torch_grads, _, _ = run("reference", inp, mode)
    pairs = [("out", ours_out, torch_out, exact_out)]
    pairs += [(f"d{k}", ours_grads[k], torch_grads[k], exact_grads[k]) for k in ("z", "gamma", "beta")]
    for name, ours, theirs, exact in pairs:
        e_ours, e_torch = rel_error(ours, exact), rel_error(theirs, exact)
        assert e_ours <= BF16_REL, f"{name}: {e_ours:.2e}"
        assert e_ours <= 2 * e_torch + 1e-3, f"{name}: ours {e_ours:.2e} vs PyTorch bf16 {e_torch:.2e}"


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(device, bn_path, mode):
    """Finite differences in float64 (the kernels accumulate in float64 for float64 inputs)."""
    inp = make_inputs((2, 2, 2, 3), device, torch.float64, seed=5)
    buffers = (inp["running_mean"].double(), inp["running_var"].double()) if mode == "eval" else (None, None)

    def fn(z, gamma, beta):
        # the residual is a constant here (its gradient, dout itself, is checked in the other tests)
        return bn_film_relu(
            z, gamma, beta, inp["residual"], *buffers, training=mode == "train", normalize=mode != "no_bn"
        )

    args = tuple(inp[k].detach().requires_grad_() for k in ("z", "gamma", "beta"))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_grad_output_broadcast_and_transposed(device, bn_path):
    """grad_output with stride 0 (from .sum()) is read in place; a non-flattenable one is copied explicitly."""
    inp = make_inputs((3, 5, 7, 6), device, seed=6)
    for loss_fn in (lambda y: y.sum(), lambda y: (y.transpose(2, 3) * inp["dout"].transpose(2, 3)).sum()):
        results = []
        for impl in ("triton", "reference"):
            z = inp["z"].clone().requires_grad_()
            gamma = inp["gamma"].clone().requires_grad_()
            out = bn_film_relu(z, gamma, inp["beta"], None, None, None, training=True, impl=impl)
            loss_fn(out).backward()
            results.append((z.grad, gamma.grad))
        assert_rel_close(results[0][0], results[1][0], FP32_REL, "dz")
        assert_rel_close(results[0][1], results[1][1], FP32_REL, "dgamma")


def test_compile_matches_reference(device):
    """impl="compile" (torch.compile of the reference) equals the reference, gradients and buffers included."""
    inp = make_inputs((3, 5, 7, 7), device, seed=7)
    out, grads, rm, rv = run("compile", inp, "train")
    ref_out, ref_grads, ref_rm, ref_rv = run("reference", inp, "train")
    assert_rel_close(out, ref_out, FP32_REL, "out")
    for k in ("z", "gamma", "beta", "residual"):
        assert_rel_close(grads[k], ref_grads[k], FP32_REL, f"d{k}")
    assert_rel_close(rm, ref_rm, FP32_REL, "running_mean")
    assert_rel_close(rv, ref_rv, FP32_REL, "running_var")


def test_rejects_bad_inputs(device):
    inp = make_inputs((3, 5, 7, 6), device)
    z, g, b = inp["z"], inp["gamma"], inp["beta"]
    with pytest.raises(ValueError, match="flattenable"):
        bn_film_relu(z.transpose(2, 3), g, b, None, None, None, training=True)
    with pytest.raises(ValueError, match="eval mode"):
        bn_film_relu(z, g, b, None, None, None, training=False)
    with pytest.raises(ValueError, match="gamma"):
        bn_film_relu(z, g[:, :4], b, None, None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn_film_relu(z[:1, :, :1, :1], g[:1], b[:1], None, None, None, training=True)
    with pytest.raises(ValueError, match="impl"):
        bn_film_relu(z, g, b, None, None, None, training=True, impl="cuda")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@cuda_only
def test_model_size_on_gpu(device, bn_path, layout, mode, dtype):
    """The model's size (batch 64, 128 maps, 14×14), compiled kernels with the GPU launch settings."""
    inp = make_inputs((64, 128, 14, 14), device, dtype, seed=8)
    if layout == "channels_last":
        for k in ("z", "residual", "dout"):
            inp[k] = inp[k].contiguous(memory_format=torch.channels_last)
    check_against_reference(inp, mode)
