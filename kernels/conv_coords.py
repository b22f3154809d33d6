"""A convolution over `cat(x, coords)` without materialising the concatenation; 1×1 case fused in Triton.

The two coordinate maps (channel 0: x = linspace(−1, 1, W) along the width, channel 1: y = linspace(−1, 1, H))
are the same for every sample, so their part of the convolution is a bias map that depends only on the weights:
    conv(cat(x, coords), W, b) = conv(x, W_x) + b + conv(coords, W_coords)        (W = [W_x | W_coords])
For a k×k conv with zero padding the bias map carries the border effect; `coord_bias_map` computes it.

1×1 conv (padding 0), per sample n and pixel p = (h, w), with X_n = x[n] as a [C_in, H·W] matrix:
    Y_n = act(W_x · X_n + b + w_cx·cx(p) + w_cy·cy(p))              (act = ReLU or identity)
one GEMM per sample with the coordinate terms, bias and ReLU in the epilogue (the coordinates are computed in
the kernel as torch.linspace does). Backward with G_n = dY_n·[Y_n > 0] (or dY_n without ReLU):
    dX_n = W_xᵀ · G_n,     [dW_x | dW_coords | db] = Σ_n G_n · [X_n ; cx ; cy ; 1]ᵀ
(the second is one GEMM over K = N·H·W, split over the batch; the coordinate columns' and the bias gradient are
a second, 16-column product of the same G tiles, in the same pass). Products run in the input dtype with float32 accumulation
(float64 for float64 inputs); float32 products use TF32 exactly when torch's own float32 matmuls may.

k > 1 (the feature stem's 3×3 conv): cuDNN on the x part, plus the bias map (plain PyTorch autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (
    CONV_WGRAD_SAMPLES_PER_SPLIT,
    DEFAULT_SM_COUNT,
    INTERPRET,
    TL_DTYPE,
    acc_dtype,
    aligned,
    cdiv,
    check_device,
    check_tensors,
    empty_like_layout,
    gemm_tuning,
    hw_stride,
    no_double_backward,
    vec_hint,
)

# ----------------------------------------------------------------------------------------------------------
# Coordinates and the reference (the specification)
# ----------------------------------------------------------------------------------------------------------


def coord_map(
    h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The two coordinate maps [2, H, W]: channel 0 is x (varies along the width), channel 1 is y; in [−1, 1]."""
    x = torch.linspace(-1, 1, w, device=device, dtype=dtype).view(1, w).expand(h, w)
    y = torch.linspace(-1, 1, h, device=device, dtype=dtype).view(h, 1).expand(h, w)
    return torch.stack([x, y], 0)


def coord_bias_map(w_coords: torch.Tensor, h: int, w: int, padding: int) -> torch.Tensor:
    """The coordinate columns' share of the conv output, [C_out, H_out, W_out] (differentiable in w_coords).

    Equals conv2d(coords[None], w_coords, padding=padding)[0], zero padding's border effect included. Computed
    in w_coords' dtype with autocast off (it is tiny and depends only on the weights).
    """
    with torch.autocast(w_coords.device.type, enabled=False):
        coords = coord_map(h, w, w_coords.device, w_coords.dtype)
        return F.conv2d(coords[None], w_coords, padding=padding)[0]


def conv_coords_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, padding: int, relu: bool
) -> torch.Tensor:
    """Plain PyTorch, as the original code: concatenate the coordinate maps, convolve, optional ReLU."""
    n, _, h, w = x.shape
    coords = coord_map(h, w, x.device, x.dtype).unsqueeze(0).expand(n, 2, h, w)
    out = F.conv2d(torch.cat([x, coords], 1), weight, bias, padding=padding)
    return F.relu(out) if relu else out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


# torch.linspace(−1, 1, steps)[i], computed the way PyTorch does (from both ends, fused multiply-adds):
# step = 2/(steps − 1), i < half ? −1 + step·i : 1 − step·(steps − 1 − i). The host passes den = steps − 1 and
# half = steps // 2 (den = half = 1 for steps = 1, whose only value is −1). The step is divided in float64 and
# rounded once to ACC, as the host would (and exact for float64, used by gradcheck).
@triton.jit
def _linspace(i, den, half, ACC: tl.constexpr):
    step = tl.cast(2.0 / tl.cast(den, tl.float64), ACC)
    lo = tl.fma(step, tl.cast(i, ACC), -1.0)
    hi = tl.fma(-step, tl.cast(den - i, ACC), 1.0)
    return tl.where(i < half, lo, hi)


# A [BLOCK_M, BLOCK_K] × [BLOCK_K, BLOCK_N] product accumulated into acc, whose dtype (float32, or float64 for
# float64 inputs) is the product's out_dtype (triton 3.6 asserts that they agree and defaults to float32). The
# interpreter's bf16/fp16 tl.dot gives wrong results (seen with triton 3.9): there (only) 16-bit operands, already
# rounded, are widened to float32 (WIDEN), the same arithmetic (their products are exact in float32, the
# accumulation is float32 either way). float32 operands keep PRECISION ("tf32" rounds them, as a GPU does).
@triton.jit
def _mma(a, b, acc, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    a = a.to(COMPUTE)
    b = b.to(COMPUTE)
    if WIDEN:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


# Y[n, o, p] = act(Σ_i W[o, i]·X[n, i, p] + W[o, C_in]·cx(p) + W[o, C_in + 1]·cy(p) + b[o])
# grid: (samples × position blocks, output-channel blocks); axis 0 takes any batch (CUDA caps axes 1, 2 at 65,535)
@gemm_tuning("forward", m=lambda a: a["C_out"], n=lambda a: a["HW"], k=lambda a: a["C_in"])
@triton.jit(do_not_specialize=["Wd", "Hd", "den_x", "half_x", "den_y", "half_y"])
def _forward_kernel(
    X, W, B, Y,
    C_in, C_out, HW, Wd, Hd, den_x, half_x, den_y, half_y,
    s_xn, s_xc, s_xp, s_wo, s_wi, s_yn, s_yc, s_yp,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, COMPUTE: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    HW, s_xn, s_xc = aligned(HW, VEC), aligned(s_xn, VEC), aligned(s_xc, VEC)
    s_yn, s_yc = aligned(s_yn, VEC), aligned(s_yc, VEC)
    p_blocks = tl.cdiv(HW, BLOCK_N)
    n64 = tl.cast(tl.program_id(0) // p_blocks, tl.int64)
    o = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = (tl.program_id(0) % p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = o < C_out
    pmask = p < HW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, C_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < C_in
        w = tl.load(
            W + o[:, None] * s_wo + k[None, :] * s_wi, mask=omask[:, None] & kmask[None, :], other=0.0
        )
        x_ptr = X + n64 * s_xn + k[:, None] * s_xc + p[None, :] * s_xp
        x = tl.load(x_ptr, mask=kmask[:, None] & pmask[None, :], other=0.0)
        acc = _mma(w, x, acc, COMPUTE, PRECISION, WIDEN)
    w_cx = tl.load(W + o * s_wo + C_in * s_wi, mask=omask, other=0.0).to(ACC)
    w_cy = tl.load(W + o * s_wo + (C_in + 1) * s_wi, mask=omask, other=0.0).to(ACC)
    cx = _linspace(p % Wd, den_x, half_x, ACC)
    cy = _linspace(p // Wd, den_y, half_y, ACC)
    acc += w_cx[:, None] * cx[None, :] + w_cy[:, None] * cy[None, :]
    if HAS_BIAS:
        acc += tl.load(B + o, mask=omask, other=0.0).to(ACC)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    y_ptr = Y + n64 * s_yn + o[:, None] * s_yc + p[None, :] * s_yp
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=omask[:, None] & pmask[None, :])


# G = dY·[Y > 0] (or dY), loaded as a tile of sample n: channels o × positions p (index blocks, broadcastable).
@triton.jit
def _grad_tile(
    DY, Y, n64, o, p, mask, s_dn, s_dc, s_dp, s_yn, s_yc, s_yp, RELU: tl.constexpr, ACC: tl.constexpr
):
    g = tl.load(DY + n64 * s_dn + o * s_dc + p * s_dp, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.load(Y + n64 * s_yn + o * s_yc + p * s_yp, mask=mask, other=0.0)
        g = tl.where(y <= 0.0, 0.0, g)  # torch's relu backward: a NaN output passes the gradient
    return g


# dX[n, i, p] = Σ_o W[o, i]·G[n, o, p]
# grid: (samples × position blocks, input-channel blocks)
@gemm_tuning("dx", m=lambda a: a["C_in"], n=lambda a: a["HW"], k=lambda a: a["C_out"])
@triton.jit
def _backward_dx_kernel(
    DY, Y, W, DX,
    C_in, C_out, HW,
    s_dn, s_dc, s_dp, s_yn, s_yc, s_yp, s_wo, s_wi, s_xn, s_xc, s_xp,
    RELU: tl.constexpr, COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    HW, s_dn, s_dc = aligned(HW, VEC), aligned(s_dn, VEC), aligned(s_dc, VEC)
    s_yn, s_yc = aligned(s_yn, VEC), aligned(s_yc, VEC)
    s_xn, s_xc = aligned(s_xn, VEC), aligned(s_xc, VEC)
    p_blocks = tl.cdiv(HW, BLOCK_N)
    n64 = tl.cast(tl.program_id(0) // p_blocks, tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = (tl.program_id(0) % p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    imask = i < C_in
    pmask = p < HW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, C_out, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < C_out
        wt = tl.load(
            W + i[:, None] * s_wi + k[None, :] * s_wo, mask=imask[:, None] & kmask[None, :], other=0.0
        )
        mask = kmask[:, None] & pmask[None, :]
        g = _grad_tile(
            DY, Y, n64, k[:, None], p[None, :], mask, s_dn, s_dc, s_dp, s_yn, s_yc, s_yp, RELU, ACC
        )
        acc = _mma(wt, g, acc, COMPUTE, PRECISION, WIDEN)
    dx_ptr = DX + n64 * s_xn + i[:, None] * s_xc + p[None, :] * s_xp
    tl.store(dx_ptr, acc.to(DX.dtype.element_ty), mask=imask[:, None] & pmask[None, :])


# For one batch split s, summed over its samples n and all positions p:
#   dW_x[o, i] = Σ G[n, o, p]·X[n, i, p]      (the GEMM: M = C_out, N = C_in, K = samples × positions)
#   [dW_cx | dW_cy | db][o] = Σ G[n, o, p]·E[p, :],   E[p] = [cx(p), cy(p), 1, 0, …, 0]  (16 columns, for tl.dot)
# The second sum is a small product too, so that the G tile is only ever an operand of products: a tile that is
# both an asynchronous wgmma operand in shared memory and read into registers (tl.sum) races with the pipeline's
# prefetch on sm_90 (dW 8% off in bf16 without the ReLU, seen on an H200; `kernels.aot --check` refuses the
# pattern). E's values are rounded to the products' dtype, as the reference's concatenated coordinates are.
# Row s of OUT holds dW [C_out, C_in + 2], then db [C_out], so that one sum over the splits gives both, contiguous;
# i-block 0 stores the coordinate and bias columns.
# grid: (input-channel blocks, output-channel blocks, batch splits)
@gemm_tuning("dw", m=lambda a: a["C_out"], n=lambda a: a["C_in"], k=lambda a: a["HW"])
@triton.jit(do_not_specialize=["N", "NPS", "Wd", "Hd", "den_x", "half_x", "den_y", "half_y"])
def _backward_dw_kernel(
    DY, Y, X, OUT,
    N, C_in, C_out, HW, NPS, Wd, Hd, den_x, half_x, den_y, half_y,
    s_dn, s_dc, s_dp, s_yn, s_yc, s_yp, s_xn, s_xc, s_xp,
    RELU: tl.constexpr, COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    HW, s_dn, s_dc = aligned(HW, VEC), aligned(s_dn, VEC), aligned(s_dc, VEC)
    s_yn, s_yc = aligned(s_yn, VEC), aligned(s_yc, VEC)
    s_xn, s_xc = aligned(s_xn, VEC), aligned(s_xc, VEC)
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(2)
    o = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    e_col = tl.arange(0, 16)
    omask = o < C_out
    jmask = j < C_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_e = tl.zeros([BLOCK_M, 16], dtype=ACC)
    n0 = pid_s * NPS
    n1 = tl.minimum(n0 + NPS, N)
    for n in range(n0, n1):
        n64 = tl.cast(n, tl.int64)
        for p0 in range(0, HW, BLOCK_K):
            p = p0 + tl.arange(0, BLOCK_K)
            pmask = p < HW
            g = _grad_tile(
                DY, Y, n64, o[:, None], p[None, :], omask[:, None] & pmask[None, :],
                s_dn, s_dc, s_dp, s_yn, s_yc, s_yp, RELU, ACC,
            )  # fmt: skip
            x_ptr = X + n64 * s_xn + j[None, :] * s_xc + p[:, None] * s_xp
            x = tl.load(x_ptr, mask=pmask[:, None] & jmask[None, :], other=0.0)
            acc = _mma(g, x, acc, COMPUTE, PRECISION, WIDEN)
            cx = _linspace(p % Wd, den_x, half_x, ACC)[:, None]
            cy = _linspace(p // Wd, den_y, half_y, ACC)[:, None]
            e = tl.where(e_col[None, :] == 0, cx, tl.where(e_col[None, :] == 1, cy, 1.0))
            e = tl.where((e_col[None, :] < 3) & pmask[:, None], e, 0.0)
            acc_e = _mma(g, e, acc_e, COMPUTE, PRECISION, WIDEN)
    row = OUT + pid_s * (C_out * (C_in + 3))
    tl.store(row + o[:, None] * (C_in + 2) + j[None, :], acc, mask=omask[:, None] & jmask[None, :])
    first = omask & ((0 * o + pid_j) == 0)  # i-block 0 stores the row sums (a block mask: see bn_film_relu)
    g_cx = tl.sum(tl.where(e_col[None, :] == 0, acc_e, 0.0), axis=1)
    g_cy = tl.sum(tl.where(e_col[None, :] == 1, acc_e, 0.0), axis=1)
    g_one = tl.sum(tl.where(e_col[None, :] == 2, acc_e, 0.0), axis=1)
    tl.store(row + o * (C_in + 2) + C_in, g_cx, mask=first)
    tl.store(row + o * (C_in + 2) + C_in + 1, g_cy, mask=first)
    tl.store(row + C_out * (C_in + 2) + o, g_one, mask=first)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _linspace_args(steps: int) -> tuple[int, int]:
    """(den, half) of torch.linspace(−1, 1, steps) for `_linspace`."""
    return (1, 1) if steps == 1 else (steps - 1, steps // 2)


def _precision(compute: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 exactly when torch's own float32 matmuls may use it
    (`torch.backends.cuda.matmul.allow_tf32`, i.e. `torch.get_float32_matmul_precision()` != "highest")."""
    return "tf32" if compute == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _widen(compute: torch.dtype) -> bool:
    """Whether `_mma` widens the operands to float32: 16-bit products under the interpreter only."""
    return INTERPRET and compute in (torch.bfloat16, torch.float16)


def _wgrad_samples_per_split(n: int, c_in: int, c_out: int, device: torch.device) -> int:
    """Samples per split of the weight gradient: CONV_WGRAD_SAMPLES_PER_SPLIT if set, else the fewest that give
    enough splits for (64×64 tiles) × splits to cover the GPU's SMs (split partials: splits × C_out × (C_in + 3))."""
    if CONV_WGRAD_SAMPLES_PER_SPLIT:
        return CONV_WGRAD_SAMPLES_PER_SPLIT
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    tiles = cdiv(c_out, 64) * cdiv(c_in, 64)
    return cdiv(n, min(n, cdiv(sms or DEFAULT_SM_COUNT, tiles)))


def _conv1x1_forward(x, weight, bias, relu, compute):
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    hw = h * w
    y = empty_like_layout((n, c_out, h, w), x, compute)
    acc = acc_dtype(compute)
    den_x, half_x = _linspace_args(w)
    den_y, half_y = _linspace_args(h)

    def grid(meta):
        return n * cdiv(hw, meta["BLOCK_N"]), cdiv(c_out, meta["BLOCK_M"])

    _forward_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        c_in, c_out, hw, w, h, den_x, half_x, den_y, half_y,
        x.stride(0), x.stride(1), hw_stride(x, "x"), weight.stride(0), weight.stride(1),
        y.stride(0), y.stride(1), hw_stride(y, "out"),
        HAS_BIAS=bias is not None, RELU=relu, COMPUTE=TL_DTYPE[compute], ACC=TL_DTYPE[acc],
        PRECISION=_precision(compute), WIDEN=_widen(compute), VEC=vec_hint(hw, x, y),
    )  # fmt: skip
    return y


def _conv1x1_backward(dy, y, x, weight, relu, need_dx, need_dw):
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    hw = h * w
    compute = y.dtype
    acc = acc_dtype(compute)
    try:
        d_strides = (dy.stride(0), dy.stride(1), hw_stride(dy, "grad_output"))
    except ValueError:
        # The incoming gradient's layout is not ours to choose; an exotic one costs one explicit copy.
        dy = dy.contiguous()
        d_strides = (dy.stride(0), dy.stride(1), hw_stride(dy, "grad_output"))
    y_strides = (y.stride(0), y.stride(1), hw_stride(y, "out"))
    x_strides = (x.stride(0), x.stride(1), hw_stride(x, "x"))
    flags = dict(
        RELU=relu, COMPUTE=TL_DTYPE[compute], ACC=TL_DTYPE[acc], PRECISION=_precision(compute),
        WIDEN=_widen(compute),
    )  # fmt: skip
    dx = dw = db = None
    if need_dx:
        dx = empty_like_layout(tuple(x.shape), x, x.dtype)

        def dx_grid(meta):
            return n * cdiv(hw, meta["BLOCK_N"]), cdiv(c_in, meta["BLOCK_M"])

        _backward_dx_kernel[dx_grid](
            dy, y, weight, dx, c_in, c_out, hw,
            *d_strides, *y_strides, weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
            hw_stride(dx, "dx"), VEC=vec_hint(hw, dy, y, dx), **flags,
        )  # fmt: skip
    if need_dw:
        nps = _wgrad_samples_per_split(n, c_in, c_out, x.device)
        splits = cdiv(n, nps)
        parts = torch.empty((splits, c_out * (c_in + 3)), device=x.device, dtype=acc)
        den_x, half_x = _linspace_args(w)
        den_y, half_y = _linspace_args(h)

        def dw_grid(meta):
            return cdiv(c_in, meta["BLOCK_N"]), cdiv(c_out, meta["BLOCK_M"]), splits

        _backward_dw_kernel[dw_grid](
            dy, y, x, parts, n, c_in, c_out, hw, nps, w, h, den_x, half_x, den_y, half_y,
            *d_strides, *y_strides, *x_strides, VEC=vec_hint(hw, dy, y, x), **flags,
        )  # fmt: skip
        total = parts[0] if splits == 1 else parts.sum(0)
        dw, db = total[: c_out * (c_in + 2)].view(c_out, c_in + 2), total[c_out * (c_in + 2) :]
    return dx, dw, db


class ConvCoords1x1Function(torch.autograd.Function):
    """Autograd wrapper of the fused 1×1 coordinate conv; saves x, the weight and the output (for the ReLU mask)."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu, compute):
        y = _conv1x1_forward(x, weight, bias, relu, compute)
        ctx.save_for_backward(x, weight, y)
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        no_double_backward("conv_coords")
        x, weight, y = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dw, db = _conv1x1_backward(dy, y, x, weight, ctx.relu, need_dx, need_dw)
        if dw is not None:
            dw = dw.to(weight.dtype).view(weight.shape)
        if db is not None and ctx.has_bias:
            db = db.to(ctx.bias_dtype)
        else:
            db = None
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------

_compiled_reference = None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d would compute in: autocast's (for float32 inputs) when enabled, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    if x.dtype != weight.dtype:
        raise TypeError(f"conv_coords: x is {x.dtype} but weight is {weight.dtype} (and autocast is off)")
    return x.dtype


def _conv_coords_unfused(x, weight, bias, padding, relu):
    """k > 1: conv of the x part (cuDNN) + the coordinate bias map, with plain autograd."""
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    out = F.conv2d(x, weight[:, :c_in], bias, padding=padding)
    out = out + coord_bias_map(weight[:, c_in:], h, w, padding).to(out.dtype)
    return F.relu(out) if relu else out


def conv_coords(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    padding: int,
    relu: bool,
    impl: str = "triton",
) -> torch.Tensor:
    """`act(conv2d(cat([x, coords]), weight, bias, padding))` without building the concatenation.

    x: [N, C_in, H, W] (contiguous NCHW or channels_last); weight: [C_out, C_in + 2, k, k], its last two input
    columns act on the coordinate maps (x, then y); bias: [C_out] or None; act = ReLU if relu. Under autocast the
    products run in the autocast dtype, as F.conv2d. impl: "triton" (fused 1×1 kernel; k > 1 uses cuDNN plus a
    coordinate bias map), "reference" (plain PyTorch, concatenating), "compile" (torch.compile of the reference).
    """
    check_tensors("conv_coords", x=x, weight=weight, bias=bias)
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1] + 2:
        raise ValueError(
            f"conv_coords: need x [N, C_in, H, W] and weight [C_out, C_in + 2, k, k], got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv_coords: bias must be [C_out] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if impl == "reference":
        return conv_coords_reference(x, weight, bias, padding=padding, relu=relu)
    if impl == "compile":
        global _compiled_reference
        if _compiled_reference is None:
            _compiled_reference = torch.compile(conv_coords_reference, dynamic=False)
        return _compiled_reference(x, weight, bias, padding=padding, relu=relu)
    if impl != "triton":
        raise ValueError(f"conv_coords: impl must be 'triton', 'reference' or 'compile', got '{impl}'")
    if weight.shape[2] != 1 or weight.shape[3] != 1 or padding != 0:
        return _conv_coords_unfused(x, weight, bias, padding, relu)
    check_device(x, weight, bias)
    hw_stride(x, "x")
    return ConvCoords1x1Function.apply(x, weight, bias, relu, _compute_dtype(x, weight))
