"""Helpers shared by the ops: interpreter detection, dtype mapping, layout checks, launch settings.

Launch settings are plain constants here so that they can be tuned on a GPU without touching the kernels. Under
`TRITON_INTERPRET=1` (CPU development) one fixed, large-tile setting is used: the interpreter costs about a
millisecond per program-iteration, so fewer, larger tiles are much faster there.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# FASTFILM_KERNELS_AS_GPU=sm_90 (or sm_80): the launchers choose as on that GPU, also under the interpreter: the
# GPU's BN tiles and batch splits, its autotune candidates (the pick fixed by GEMM_AS_GPU_PICK, the winner a GPU
# could choose: tests run each one), weight-gradient splits sized by its SM count, TF32 as torch's switch says.
# Then a CPU run of the tests takes the code paths a GPU takes (the interpreter still computes the arithmetic).
AS_GPU_SMS = {"sm_90": 132, "sm_80": 108}
AS_GPU: str = os.environ.get("FASTFILM_KERNELS_AS_GPU", "")
if AS_GPU and AS_GPU not in AS_GPU_SMS:
    raise ValueError(f"FASTFILM_KERNELS_AS_GPU={AS_GPU!r}: expected one of {sorted(AS_GPU_SMS)}")
GPU_CHOICES: bool = not INTERPRET or bool(AS_GPU)  # the launchers choose as on a GPU

TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Elements per tile of the BatchNorm-FiLM kernels.
BN_TILE = 2048 if GPU_CHOICES else 16384
BN_NUM_WARPS = 4
# The split path's reductions (training statistics, the backward's sums) divide each channel block's N·H·W
# values into splits — groups of whole samples, or one sample's positions in chunks when a sample is large (the
# stem at 112²) — so that channel blocks × splits ≈ BN_SPLIT_PROGRAMS_PER_SM × the GPU's SMs, with at least
# BN_MIN_TILES_PER_SPLIT tiles per split; a small finalize kernel combines the splits' partials once. Under the
# interpreter (without FASTFILM_KERNELS_AS_GPU) 0: one split, the fewest programs (`bn_film_relu._split_plan`).
BN_SPLIT_PROGRAMS_PER_SM = 8 if GPU_CHOICES else 0
BN_MIN_TILES_PER_SPLIT = 4
# Tests force a split: (samples per split, position tiles per chunk); None: the rule above.
BN_SPLIT: tuple[int, int] | None = None
# Training mode in one launch forward (statistics, then apply) and one backward (sums, then dz), one program per
# channel reading the whole batch twice (the second pass from L2), when M = N·H·W ≤ BN_ONE_LAUNCH_MAX_M: the
# paper's ResBlock at batch 64 (M = 12,544, 128 programs) saves two launches each way. Above it the split path
# (statistics over splits, their finalize, then an apply over every (sample, channel, position) tile) spreads
# the work over more SMs than C programs can. The threshold is a prediction (kernels/README.md), not a measurement. Under
# the interpreter (without FASTFILM_KERNELS_AS_GPU) 0: the split path's few large tiles run there ~8× faster than
# C one-channel programs (the kernel tests run both paths: their `bn_path` fixture).
BN_ONE_LAUNCH_MAX_M = 32768 if GPU_CHOICES else 0
# Elements per tile (samples × positions of one channel) and warps of the one-launch kernels: 16 per thread, as
# the split kernels' tiles, with twice the warps (one program per SM: more loads in flight).
BN_ONE_LAUNCH_TILE = 4096 if GPU_CHOICES else 16384
BN_ONE_LAUNCH_NUM_WARPS = 8
# Tests force a path: True (one launch), False (split), None (the rule above).
BN_ONE_LAUNCH: bool | None = None

# 1×1 conv GEMMs on a GPU: autotuned lists per kernel, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
# "mma": tensor-core products (bf16, fp16, float32 as TF32). "fma": float32 at IEEE precision, which multiplies
# on the CUDA cores and holds more operands in registers: 1–2 stages, shorter K blocks or more warps (the "mma"
# lists spill there: loads prefetched for later stages wait in registers). "fp64": float64 (gradcheck's dtype,
# not a speed path): one small tile that holds twice-as-wide operands without spilling. `python -m kernels.aot`
# compiles every one for sm_90 and sm_80 (tests/kernels/test_aot.py): none spills, none needs more shared memory
# than an A100 block may have (166,912 B). Under the interpreter the blocks are fitted to the problem instead, up
# to GEMM_INTERPRET_CONFIG; GEMM_INTERPRET_EXACT[kind] (tests) imposes exact blocks.
GEMM_GPU_CONFIGS = {
    # forward: M = C_out, N = H·W of one sample, K = C_in
    "forward": {
        "mma": [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3)],
        "fma": [(32, 64, 32, 4, 2), (64, 64, 16, 4, 2), (128, 64, 16, 8, 2)],
        "fp64": [(32, 32, 16, 8, 1)],
    },
    # dx: M = C_in, N = H·W of one sample, K = C_out
    "dx": {
        "mma": [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3)],
        "fma": [(64, 64, 16, 4, 2), (64, 64, 32, 4, 1), (128, 64, 16, 8, 2)],
        "fp64": [(32, 32, 16, 8, 1)],
    },
    # dW: M = C_out, N = C_in, K = N·H·W (split over the batch until the grid covers the SMs); a second
    # accumulator [BLOCK_M, 16] holds the coordinate and bias columns, hence 8 warps for the 64×64 tiles
    "dw": {
        "mma": [(64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (128, 64, 32, 8, 3)],
        "fma": [(64, 64, 32, 4, 1), (32, 64, 32, 4, 1), (64, 64, 32, 8, 1)],
        "fp64": [(32, 32, 16, 8, 1)],
    },
}
GEMM_INTERPRET_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}
GEMM_INTERPRET_EXACT: dict[str, dict[str, int]] = {}
# Under the interpreter with FASTFILM_KERNELS_AS_GPU: index of the candidate (in the family the launch's products
# select) each GEMM kind runs with, standing in for the autotuner's winner; a shorter list wraps around.
GEMM_AS_GPU_PICK: dict[str, int] = {"forward": 0, "dx": 0, "dw": 0}
# Weight gradient's split-K over the batch: under the interpreter this many samples per split; on a GPU (None)
# as many splits as it takes for the 64×64-tile grid to cover the SMs (conv_coords._wgrad_samples_per_split).
CONV_WGRAD_SAMPLES_PER_SPLIT: int | None = None if GPU_CHOICES else 64
DEFAULT_SM_COUNT = AS_GPU_SMS.get(AS_GPU, 132)  # H100/H200 SXM; used when there is no CUDA device to ask


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SMs of `device` (cached), or DEFAULT_SM_COUNT without a CUDA device (interpreter, meta tensors)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _family(compute, precision: str) -> str:
    """The config family of a GEMM's products: "fp64", "fma" for IEEE float32, "mma" (tensor cores) else."""
    if compute == tl.float64:
        return "fp64"
    return "fma" if precision == "ieee" and compute == tl.float32 else "mma"


def _configs_for_products(configs: list, named_args: dict, **kwargs) -> list:
    """The autotune configs of the family that fits the launch's products (`_family`)."""
    family = _family(kwargs["COMPUTE"], kwargs["PRECISION"])
    return [c for c in configs if c.family == family]


def as_gpu_blocks(kind: str, compute, precision: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the GPU candidate GEMM_AS_GPU_PICK[kind] selects for these products."""
    configs = GEMM_GPU_CONFIGS[kind][_family(compute, precision)]
    return configs[GEMM_AS_GPU_PICK[kind] % len(configs)][:3]


# What changes the best GEMM config, beyond the sizes and the products: the ReLU epilogue (an extra load in the
# backward), the alignment hint and the layout (the position stride: 1 in NCHW, C in channels_last).
GEMM_TUNING_KEYS = {
    "forward": ["RELU", "VEC", "s_xp", "s_yp"],
    "dx": ["RELU", "VEC", "s_dp", "s_xp"],
    "dw": ["RELU", "VEC", "s_dp", "s_xp"],
}


def gemm_tuning(kind: str, m: Callable[[dict], int], n: Callable[[dict], int], k: Callable[[dict], int]):
    """Block sizes of a GEMM kernel whose sizes M, N, K are functions of its arguments.

    On a GPU: autotuned over GEMM_GPU_CONFIGS[kind] (the family that fits the products), keyed on the problem
    size, the products' dtype and precision, the epilogue, alignment and layout. Under the interpreter with
    FASTFILM_KERNELS_AS_GPU: the candidate GEMM_AS_GPU_PICK[kind] of that family. Under the interpreter: one block
    per dimension sized to the problem (power of 2, at least 16 for tl.dot, at most GEMM_INTERPRET_CONFIG), since
    its cost grows with the tile, masked or not.
    """

    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    sizes = dict(zip(names, (m, n, k)))

    def fit(a: dict, name: str) -> int:
        if kind in GEMM_INTERPRET_EXACT:
            return GEMM_INTERPRET_EXACT[kind][name]
        if AS_GPU:
            return as_gpu_blocks(kind, a["COMPUTE"], a["PRECISION"])[names.index(name)]
        return max(16, min(GEMM_INTERPRET_CONFIG[name], next_power_of_2(sizes[name](a))))

    def decorate(fn):
        if INTERPRET:
            return triton.heuristics({name: (lambda a, name=name: fit(a, name)) for name in names})(fn)
        configs = []
        for family, settings in GEMM_GPU_CONFIGS[kind].items():
            for bm, bn, bk, w, s in settings:
                config = triton.Config(
                    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s
                )
                config.family = family
                configs.append(config)
        key = ["C_in", "C_out", "HW", "COMPUTE", "PRECISION", *GEMM_TUNING_KEYS[kind]]
        prune = {"early_config_prune": _configs_for_products}
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(fn)

    return decorate


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on the host: `triton.cdiv` (and `triton.next_power_of_2`) are constexpr functions in triton ≥ 3.6,
    ~4 µs a call from Python; the launchers call them several times per launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (as `triton.next_power_of_2`; 0 for n = 0), at a plain function's cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@triton.jit
def aligned(x, VEC: tl.constexpr):
    """x, which the launcher checked is a multiple of VEC, in a form that tells the compiler so (tl.multiple_of
    does not apply to scalars in triton 3.9). Then loads along an axis whose stride is 1 vectorise: H·W = 196 and
    stride 196 are multiples of 4, not of the 16 that Triton's own specialisation looks for. VEC = 1: no-op."""
    return x // VEC * VEC


def vec_hint(hw: int, *tensors: torch.Tensor) -> int:
    """VEC for `aligned`: the largest power of two, at most 16, that divides H·W and every tensor's sample and
    channel strides (so 1 in channels_last, where the channel stride is 1 and the channel axis vectorises anyway)."""
    g = hw
    for t in tensors:
        s = t.stride()
        g = math.gcd(g, s[0], s[1])
    return min(16, g & -g) if g else 16


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when any input is float64 (used by gradcheck)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    """Refuse, naming the argument, a tensor that is not floating point or not on the first tensor's device.

    The kernels take float16, bfloat16, float32 and float64 (the pointers' element types); anything else would
    compute garbage or fail inside Triton, and a tensor on another device fails at the launch with no name.
    """
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dtype not in TL_DTYPE:
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {kind}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device}, {first_name} on {first.device}: put them on one device"
            )


def no_double_backward(op: str) -> None:
    """Refuse a backward run with create_graph=True: the kernels' gradients carry no graph, so a second derivative
    (a gradient penalty, double backward) would silently miss this op's terms. Called inside backward, where grad
    mode is on exactly when the caller asked for create_graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: impl='triton' has no second derivatives (backward with create_graph=True); "
            "use impl='reference' (kernels=reference) for double backward"
        )


def check_device(*tensors: torch.Tensor | None) -> None:
    """Refuse CPU tensors unless Triton runs in its interpreter (a clear error instead of a launch failure)."""
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(
                "kernels: impl='triton' got CPU tensors; on a machine without GPU set TRITON_INTERPRET=1 "
                "before triton is imported, or use impl='reference'"
            )


def hw_stride(t: torch.Tensor, name: str) -> int:
    """The stride of the flattened (H, W) position of a 4-D tensor [N, C, H, W].

    Contiguous NCHW (stride 1), channels_last (stride C) and broadcast (stride 0) tensors qualify: their
    element (n, c, h, w) lies at n·s_n + c·s_c + (h·W + w)·s_hw. Others are refused with an error rather than
    silently copied.
    """
    _, _, h, w = t.shape
    s = t.stride()  # one call (a launcher reads several tensors' strides per launch)
    if h > 1 and w > 1 and s[2] != w * s[3]:
        raise ValueError(
            f"kernels: {name} has strides {tuple(s)}: H and W must be flattenable "
            "(contiguous NCHW or channels_last); call .contiguous() explicitly if you mean to copy"
        )
    return s[3] if w > 1 else s[2]


def is_channels_last(t: torch.Tensor) -> bool:
    """True when the channel is the fastest-varying dimension (NHWC in memory)."""
    _, c, h, w = t.shape
    return c > 1 and h * w > 1 and t.stride(1) == 1


def empty_like_layout(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty 4-D tensor in the memory layout of `like` (channels_last or contiguous NCHW)."""
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty(shape, device=like.device, dtype=dtype, memory_format=fmt)


# Last in this file: code above it keeps its line numbers, which are part of each @triton.jit function's cache key
# and so of the AOT manifest's variant ids (kernels/README.md, "The manifest").
if INTERPRET:
    # triton 3.6's interpreter behaves as 3.9's where 3.6's fails correct kernels (interpreter_compat.py)
    from kernels import interpreter_compat

    interpreter_compat.install()
