"""Every launch choice an sm_90 GPU can make, against the reference: each autotune candidate of each GEMM
(forward, dx, dW) × products (bf16, float32 as TF32, IEEE float32, float64) × layout × ReLU, the weight
gradient's SM-sized batch splits (several samples per split, as at the classifier's size), the BN kernels'
GPU tiles and splits in float32, bf16 and float64 (both training paths), and which training path the BN launchers
take at the GPU's sizes.

On a CPU this runs in the interpreter with `as_gpu` (the launchers choose as `FASTFILM_KERNELS_AS_GPU=sm_90`
makes them: the GPU's candidates, the autotuner's winner fixed per case, splits sized by 132 SMs) and with
tests/kernels/gpu_emulation.py (float32 scalars, TF32 operands, round-to-nearest bf16 as compiled code). On a GPU
the same tests run compiled, the autotuner choosing.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from types import ModuleType

import pytest
import torch

import kernels._common as common
from tests.kernels import test_bn_film_relu as bn_tests
from tests.kernels import test_conv_coords as cc_tests
from tests.kernels.conftest import BN_KERNELS as BN_KERNEL_NAMES
from tests.kernels.helpers import assert_rel_close

conv_module = importlib.import_module("kernels.conv_coords")
bn_module = importlib.import_module("kernels.bn_film_relu")

PRODUCTS = {"bf16": "mma", "tf32": "mma", "ieee": "fma", "fp64": "fp64"}
CASES = [
    (products, index)
    for products, family in PRODUCTS.items()
    for index in range(max(len(kinds[family]) for kinds in common.GEMM_GPU_CONFIGS.values()))
]


def gpu_settings(monkeypatch) -> ModuleType:
    """kernels/_common.py as FASTFILM_KERNELS_AS_GPU=sm_90 makes it (a fresh copy; the imported one is untouched)."""
    monkeypatch.setenv("FASTFILM_KERNELS_AS_GPU", "sm_90")
    spec = importlib.util.find_spec("kernels._common")
    settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings)
    assert settings.GPU_CHOICES
    return settings


@pytest.fixture
def as_gpu(monkeypatch, device):
    """The launchers choose as on an sm_90 with 132 SMs (on a GPU: the real device's choices, untouched)."""
    if device == "cpu":
        monkeypatch.setattr(common, "AS_GPU", "sm_90")
        monkeypatch.setattr(conv_module, "CONV_WGRAD_SAMPLES_PER_SPLIT", None)
        monkeypatch.setattr(conv_module, "DEFAULT_SM_COUNT", common.AS_GPU_SMS["sm_90"])
        gpu = gpu_settings(monkeypatch)
        for name in ("BN_TILE", "BN_SPLIT_PROGRAMS_PER_SM", "BN_ONE_LAUNCH_MAX_M", "BN_ONE_LAUNCH_TILE"):
            monkeypatch.setattr(bn_module, name, getattr(gpu, name))
    return monkeypatch


def pick(monkeypatch, index: int) -> None:
    """Candidate `index` of each GEMM kind's family stands in for the autotuner's winner (interpreter only)."""
    for kind in ("forward", "dx", "dw"):
        monkeypatch.setitem(common.GEMM_AS_GPU_PICK, kind, index)


def layout_inputs(inp: dict, layout: str) -> dict:
    if layout == "nhwc":
        for k in ("x", "dout"):
            inp[k] = inp[k].contiguous(memory_format=torch.channels_last)
    return inp


def check_products(inp: dict, products: str, relu: bool) -> None:
    if products == "tf32":
        cc_tests.check_tf32_against_reference(inp, relu)
    elif products == "fp64":
        out, grads = cc_tests.run("triton", inp, 0, relu)
        ref_out, ref_grads = cc_tests.run("reference", inp, 0, relu)
        assert_rel_close(out, ref_out, 1e-12, "out")
        for name in ("x", "weight", "bias"):
            assert_rel_close(grads[name], ref_grads[name], 1e-12, f"d{name}")
    else:
        cc_tests.check_against_reference(inp, 0, relu)


@pytest.mark.parametrize("products, index", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_every_gemm_candidate(device, as_gpu, products, index, layout, relu):
    """Candidate `index` of each GEMM (a shorter list wraps around) on a shape a little larger than its blocks in
    every GEMM dimension (partial last tiles everywhere), 2 samples in 2 dW splits."""
    pick(as_gpu, index)
    family = PRODUCTS[products]
    blocks = {
        kind: c[index % len(c)][:3]
        for kind, c in ((k, v[family]) for k, v in common.GEMM_GPU_CONFIGS.items())
    }
    (fm, fn, fk), (xm, xn, xk), (wm, wn, wk) = blocks["forward"], blocks["dx"], blocks["dw"]
    c_out, c_in, hw = max(fm, xk, wm) + 4, max(fk, xm, wn) + 6, max(fn, xn, wk) + 4
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(products, torch.float32)
    inp = cc_tests.make_inputs(2, c_in, c_out, 4, hw // 4, 1, device, dtype, seed=30 + index)
    if device == "cpu":
        assert conv_module._wgrad_samples_per_split(2, c_in, c_out, torch.device(device)) == 1
    check_products(layout_inputs(inp, layout), products, relu)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_classifier_projection_with_multi_sample_splits(device, as_gpu, layout):
    """The classifier's 1×1 projection (128 + 2 → 512, no ReLU) in bf16 with 10 samples: 132 SMs over 2×8 dW
    tiles make splits of 2 samples (8 at batch 64), the case that failed on the H200 (bf16, NCHW, dW 7.9e-2 off).
    At batch 64, 14×14 on a GPU: test_conv_coords.test_model_size_on_gpu."""
    if device == "cpu":
        assert conv_module._wgrad_samples_per_split(10, 128, 512, torch.device(device)) == 2
        assert conv_module._wgrad_samples_per_split(64, 128, 512, torch.device(device)) == 8
    inp = layout_inputs(cc_tests.make_inputs(10, 128, 512, 5, 6, 1, device, torch.bfloat16, seed=40), layout)
    cc_tests.check_against_reference(inp, 0, False)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["train", "eval", "no_bn"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
def test_bn_at_model_size(device, bn_path, as_gpu, layout, mode, dtype):
    """The ResBlock's BN-FiLM-ReLU-residual at 128 channels, 14×14, 5 samples, split as on an sm_90: NCHW 2
    uneven splits (4 + 1 samples), channels_last one split per sample and chunk of 4 + 3 position tiles."""
    inp = bn_tests.make_inputs((5, 128, 14, 14), device, dtype, seed=50)
    if dtype == torch.float64:  # float64 throughout, running buffers included (the reference needs one dtype)
        inp["running_mean"], inp["running_var"] = inp["running_mean"].double(), inp["running_var"].double()
    if layout == "nhwc":
        for k in ("z", "residual", "dout"):
            inp[k] = inp[k].contiguous(memory_format=torch.channels_last)
    if dtype != torch.float64:
        bn_tests.check_against_reference(inp, mode)
        return
    out, grads, rm, rv = bn_tests.run("triton", inp, mode)
    ref_out, ref_grads, ref_rm, ref_rv = bn_tests.run("reference", inp, mode)
    assert_rel_close(out, ref_out, 1e-12, "out")
    for name in ("z", "gamma", "beta", "residual"):
        assert_rel_close(grads[name], ref_grads[name], 1e-11, f"d{name}")
    if rm is not None:
        assert_rel_close(rm, ref_rm, 1e-14, "running_mean")
        assert_rel_close(rv, ref_rv, 1e-14, "running_var")


class _Recorder:
    """Stands in for a BN kernel: `kernel[grid](...)` records (name, grid, launch keywords), runs nothing."""

    def __init__(self, name: str, out: list) -> None:
        self.name, self.out = name, out

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.out.append((self.name, tuple(grid), kwargs))


def record_training_step(monkeypatch, shape: tuple, layout: str) -> list:
    """The BN launches (name, grid, launch keywords) of one training forward + backward at `shape`: the real
    launchers on meta tensors, every BN kernel replaced by a recorder, so nothing runs."""
    launches: list = []
    for name in BN_KERNEL_NAMES:
        monkeypatch.setattr(bn_module, name, _Recorder(name, launches))
    n, c = shape[:2]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    z = torch.empty(shape, device="meta", memory_format=fmt)
    gamma = beta = torch.empty((n, c), device="meta")
    rm = rv = torch.empty(c, device="meta")
    _, mean, rstd = bn_module._forward(z, gamma, beta, z, rm, rv, bn_module.MODE_BATCH_STATS, 0.1, 1e-5)
    bn_module._backward(z, z, gamma, beta, mean, rstd, bn_module.MODE_BATCH_STATS)
    return launches


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bn_training_path_at_gpu_sizes(device, as_gpu, layout):
    """The rule the launchers follow on a GPU (BN_ONE_LAUNCH_MAX_M = 32,768 values per channel): the paper's
    ResBlock (batch 64, 128 maps of 14×14: M = 12,544) trains in one launch each way, 128 programs (one per
    channel) of 16 (channels_last: 8) samples × 256 positions with 8 warps, also at batch 167 (M = 32,732); batch
    168 (M = 32,928)
    and 70,000 take the split path (statistics, finalize, apply; reduction, finalize, dz). Recorded launches:
    nothing runs."""

    def train_step(n: int) -> list:
        return [(name, grid) for name, grid, _ in record_training_step(as_gpu, (n, 128, 14, 14), layout)]

    one = ["_one_launch_forward_kernel", "_one_launch_backward_kernel"]
    assert train_step(64) == [(name, (128,)) for name in one]
    tile = (8, 256, 8) if layout == "nhwc" else (16, 256, 8)
    launches = record_training_step(as_gpu, (64, 128, 14, 14), layout)
    assert [(kw["BLOCK_N"], kw["BLOCK_P"], kw["num_warps"]) for _, _, kw in launches] == [tile] * 2
    assert [name for name, _ in train_step(167)] == one
    split = ["_stats_kernel", "_finalize_stats_kernel", "_forward_kernel", "_backward_reduce_kernel",
             "_finalize_sums_kernel", "_backward_dz_kernel"]  # fmt: skip
    assert [name for name, _ in train_step(168)] == split
    assert [name for name, _ in train_step(70_000)] == split


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(
    "shape",
    [(64, 128, 112, 112), (64, 128, 56, 56), (64, 128, 28, 28), (168, 128, 14, 14), (512, 128, 14, 14),
     (70_000, 128, 14, 14), (256, 512, 14, 14)],
    ids=lambda s: "x".join(map(str, s)),
)  # fmt: skip
def test_bn_split_reductions_fill_the_gpu(device, as_gpu, layout, shape):
    """On an sm_90 (132 SMs) the split path's reductions — the training statistics and the backward's sums —
    run 4 to 16 programs per SM at the sizes the model takes that path: the stem's BatchNorm at 112², 56², 28²
    (batch 64; with the earlier splits of 4 whole samples, 112² in channels_last ran 2 channel blocks × 16 splits
    = 32 programs, each streaming 6 MB one tile at a time), the ResBlocks from batch 168 to 70,000, the
    classifier's 512 channels at batch 256. The finalize kernels run one program per 32 channels. Recorded
    launches (record_training_step): nothing runs."""
    n, c, h, w = shape
    grids = {name: grid for name, grid, _ in record_training_step(as_gpu, shape, layout)}
    meta = torch.device("meta")
    sms = common.sm_count(meta)  # meta tensors: DEFAULT_SM_COUNT, an sm_90's 132
    block_c, block_p = bn_module._tile(c, h * w, layout == "nhwc")
    plan = bn_module._split_plan(n, c, h * w, block_c, block_p, meta)
    assert plan.splits == common.cdiv(n, plan.nps) * common.cdiv(h * w, plan.ppc) and plan.ppc % block_p == 0
    for name in ("_stats_kernel", "_backward_reduce_kernel"):
        assert grids[name] == (common.cdiv(c, block_c), plan.splits)
        assert 4 * sms <= math.prod(grids[name]) <= 16 * sms, (name, grids[name], plan)
    assert grids["_finalize_stats_kernel"] == grids["_finalize_sums_kernel"] == (common.cdiv(c, 32),)


def test_as_gpu_choices(monkeypatch):
    """What the launchers pick as an sm_90: its candidates per products, 132-SM splits, GPU BN tiles."""
    import triton.language as tl

    monkeypatch.setattr(common, "AS_GPU", "sm_90")
    assert (
        common.as_gpu_blocks("forward", tl.bfloat16, "ieee")
        == common.GEMM_GPU_CONFIGS["forward"]["mma"][0][:3]
    )
    assert common.as_gpu_blocks("dw", tl.float32, "ieee") == common.GEMM_GPU_CONFIGS["dw"]["fma"][0][:3]
    assert common.as_gpu_blocks("dx", tl.float32, "tf32") == common.GEMM_GPU_CONFIGS["dx"]["mma"][0][:3]
    assert common.as_gpu_blocks("dx", tl.float64, "ieee") == common.GEMM_GPU_CONFIGS["dx"]["fp64"][0][:3]
    monkeypatch.setitem(common.GEMM_AS_GPU_PICK, "forward", 5)  # wraps around a list of 4
    assert (
        common.as_gpu_blocks("forward", tl.bfloat16, "ieee")
        == common.GEMM_GPU_CONFIGS["forward"]["mma"][1][:3]
    )


def test_autotune_keys_are_kernel_parameters():
    """The autotune key's names are parameters of each GEMM kernel (the autotuner skips an unknown name)."""
    import inspect

    kernels = {"forward": "_forward_kernel", "dx": "_backward_dx_kernel", "dw": "_backward_dw_kernel"}
    for kind, name in kernels.items():
        params = set(inspect.signature(_python_function(getattr(conv_module, name))).parameters)
        for key in ["C_in", "C_out", "HW", "COMPUTE", "PRECISION", *common.GEMM_TUNING_KEYS[kind]]:
            assert key in params, (kind, key)


def _python_function(obj):
    """The Python function under Triton's autotuner / heuristics / jit wrappers."""
    import inspect

    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj
