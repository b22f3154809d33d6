"""BatchNorm (affine off) → FiLM → ReLU → + residual, fused; forward and backward in Triton.

Per channel c, over the batch and positions (M = N·H·W values; p runs over H·W):
    mean_c = Σ z / M,    var_c = Σ (z − mean_c)² / M,    rstd_c = 1 / √(var_c + eps)
    scale[n,c] = γ[n,c]·rstd_c,    out = r + max((z − mean_c)·scale + β, 0)        (a subtraction, an FMA, a max
    and an add per element; not z·scale + (β − mean·scale), which cancels when |mean_c| ≫ the channel's spread)
    running_mean ← (1 − m)·running_mean + m·mean_c,   running_var ← (1 − m)·running_var + m·var_c·M/(M − 1)
The statistics are those of z − K_c (K_c = z[0, c, 0], its first value; shift-invariant for the variance) so
that a channel far from zero keeps its precision. Eval mode takes mean_c and var_c from the running buffers;
`normalize=False` (the "no BN" ablation) uses mean = 0, scale = γ.

Backward, with x̂ = (z − mean)·rstd recomputed from z (never stored) and g = dout·[(z − mean)·scale + β > 0]:
    dβ[n,c] = Σ_p g,    dγ[n,c] = Σ_p g·x̂,    dr = dout
    training:  dz = rstd·(γ·g − A_c − x̂·B_c),   A_c = Σ_n γ[n,c]·dβ[n,c] / M,   B_c = Σ_n γ[n,c]·dγ[n,c] / M
    eval:      dz = γ·rstd·g (the statistics are constants);    no BN: dz = γ·g

Kernels (all statistics and sums in float32, float64 when the inputs are float64):
    training forward   _stats_kernel (partial mean/M2 per channel block and split, Chan's parallel combine)
                       → _finalize_stats_kernel (combines the partials once: mean, rstd, the running buffers)
                       → _forward_kernel (applies)
    eval / no-BN fwd   _forward_kernel only
    training backward  _backward_reduce_kernel (dγ, dβ per split) → _finalize_sums_kernel (dγ, dβ over the
                       splits of a sample; A_c, B_c) → _backward_dz_kernel
    eval / no-BN bwd   _backward_reduce_kernel (it writes dz in the same pass; + _finalize_sums_kernel when a
                       sample's positions are split)
    training, small M  _one_launch_forward_kernel, _one_launch_backward_kernel: one program per channel, the
                       statistics (sums) pass then the apply (dz) pass in one launch each (_one_launch says when)
A split (_split_plan) is a group of whole samples or, for large maps, a chunk of one sample's positions: enough
of them that the reductions fill the GPU (the stem's 112² maps included), each combined once by a finalize.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels._common as _common
from kernels._common import (
    BN_MIN_TILES_PER_SPLIT,
    BN_NUM_WARPS,
    BN_ONE_LAUNCH_MAX_M,
    BN_ONE_LAUNCH_NUM_WARPS,
    BN_ONE_LAUNCH_TILE,
    BN_SPLIT_PROGRAMS_PER_SM,
    BN_TILE,
    TL_DTYPE,
    acc_dtype,
    aligned,
    cdiv,
    check_device,
    check_tensors,
    empty_like_layout,
    hw_stride,
    is_channels_last,
    next_power_of_2,
    no_double_backward,
    sm_count,
    vec_hint,
)

MODE_BATCH_STATS, MODE_RUNNING_STATS, MODE_NO_NORM = 0, 1, 2
# The finalize kernels' tiles: channels per program, splits (samples) per step of their loops; one stage (no
# prefetch: sm_80 spilled the sums' kernel at 64 samples × 32 channels with the default 3).
BN_FINALIZE_BLOCK_C, BN_FINALIZE_BLOCK_S, BN_FINALIZE_BLOCK_N = 32, 64, 32


# ----------------------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------------------


def bn_film_relu_reference(
    z: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    normalize: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: affine-free BatchNorm2d (batch or running statistics), FiLM, ReLU, + residual."""
    x = z
    if normalize:
        x = F.batch_norm(z, running_mean, running_var, training=training, momentum=momentum, eps=eps)
    out = F.relu(gamma[:, :, None, None] * x + beta[:, :, None, None])
    if residual is not None:
        out = residual + out
    return out.to(z.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


# Split s of a channel block's N·H·W values (_split_plan): samples [n0, n1) of group s // K, positions [pa, pb) of
# chunk s % K (K = 1: whole samples). All splits of a group have n1 − n0 samples, chunk k has pb − pa positions.
@triton.jit
def _split_range(s, N, HW, NPS, PPC, K):
    n0 = (s // K) * NPS
    pa = (s % K) * PPC
    return n0, tl.minimum(n0 + NPS, N), pa, tl.minimum(pa + PPC, HW)


# Partial statistics of z − K over split s's values (N_s·P_s of them), K = z[0, c, 0] the same pivot in every
# split (_pivot):
#   tiles t of the split in order; per tile its mean m_t and M2_t = Σ (x − m_t)²;
#   running (count k, mean μ, M2) ← Chan (_chan): δ = m_t − μ, μ += δ·n_t/(k + n_t), M2 += M2_t + δ²·k·n_t/(k + n_t).
@triton.jit
def _stats_kernel(
    Z, PMEAN, PM2,
    N, C, HW, NPS, PPC, K,
    s_zn, s_zc, s_zp,
    ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    HW, s_zn, s_zc = aligned(HW, VEC), aligned(s_zn, VEC), aligned(s_zc, VEC)
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n0, n1, pa, pb = _split_range(pid_s, N, HW, NPS, PPC, K)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    pivot = _pivot(Z, c, cmask, s_zc, ACC)
    # split 0 also stores K after the S partial means, for the finalize; here, not after the loop, where the
    # predicate spilled on sm_80 (triton 3.6, bf16 NCHW). A block-shaped mask: the interpreter mishandles scalar &
    # block masks.
    tl.store(PMEAN + tl.num_programs(1) * C + c, pivot, mask=cmask & ((0 * c + pid_s) == 0))
    for n in range(n0, n1):
        base = Z + tl.cast(n, tl.int64) * s_zn + c[:, None] * s_zc
        for p0 in range(pa, pb, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = cmask[:, None] & (p < pb)[None, :]
            x = tl.load(base + p[None, :] * s_zp, mask=mask, other=pivot[:, None]).to(ACC) - pivot[:, None]
            cnt = tl.cast(tl.minimum(pb - p0, BLOCK_P), ACC)
            t_mean = tl.sum(x, axis=1) / cnt
            d = tl.where(mask, x - t_mean[:, None], 0.0)
            t_m2 = tl.sum(d * d, axis=1)
            mean, m2 = _chan(mean, m2, tl.cast((n - n0) * (pb - pa) + p0 - pa, ACC), t_mean, t_m2, cnt)
    tl.store(PMEAN + pid_s * C + c, mean, mask=cmask)
    tl.store(PM2 + pid_s * C + c, m2, mask=cmask)


# Chan's combine of the statistics of `seen` values (mean, M2) with those of a tile of cnt values (t_mean, t_M2):
#   δ = t_mean − mean,   mean + δ·cnt/(seen + cnt),   M2 + (t_M2 + δ²·seen·cnt/(seen + cnt))
@triton.jit
def _chan(mean, m2, seen, t_mean, t_m2, cnt):
    delta = t_mean - mean
    return mean + delta * (cnt / (seen + cnt)), m2 + (t_m2 + delta * delta * (seen * cnt / (seen + cnt)))


# The statistics' pivot K of channels c: z[0, c, 0] (a non-finite K gives non-finite statistics, as z does).
@triton.jit
def _pivot(Z, c, cmask, s_zc, ACC: tl.constexpr):
    return tl.load(Z + c * s_zc, mask=cmask, other=0.0).to(ACC)


# Splits s0 … s0 + BLOCK_S − 1 of channels c in the [S, C] partials: their offsets, mask and value counts n_s.
@triton.jit
def _split_block(s0, c, cmask, N, C, HW, S, NPS, PPC, K, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    s = s0 + tl.arange(0, BLOCK_S)
    n0, n1, pa, pb = _split_range(s, N, HW, NPS, PPC, K)
    cnt = tl.cast(tl.where(s < S, (n1 - n0) * (pb - pa), 0), ACC)
    return s[:, None] * C + c[None, :], (s < S)[:, None] & cmask[None, :], cnt


# Once per channel block, the S split partials combined (split s holds n_s = N_s·P_s values), means of z − K:
#   mean = Σ n_s·mean_s / M,   var = (Σ M2_s + Σ n_s·(mean_s − mean)²) / M,   rstd = 1 / √(var + eps)
#   mean (+ K, stored by _stats_kernel after the partials) and rstd saved for the apply and the backward;
#   running buffers updated (momentum, unbiased variance)
@triton.jit
def _finalize_stats_kernel(
    PMEAN, PM2, RMEAN, RVAR, MEAN, RSTD,
    N, C, HW, S, NPS, PPC, K, M: tl.float64, momentum: tl.float64, eps: tl.float64,
    UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    M, momentum, eps = tl.cast(M, ACC), tl.cast(momentum, ACC), tl.cast(eps, ACC)  # as in _forward_kernel
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        offs, mask, cnt = _split_block(s0, c, cmask, N, C, HW, S, NPS, PPC, K, ACC, BLOCK_S)
        total += tl.sum(cnt[:, None] * tl.load(PMEAN + offs, mask=mask, other=0.0), axis=0)
    mean = total / M
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        offs, mask, cnt = _split_block(s0, c, cmask, N, C, HW, S, NPS, PPC, K, ACC, BLOCK_S)
        d = tl.where(mask, tl.load(PMEAN + offs, mask=mask, other=0.0) - mean[None, :], 0.0)
        m2 += tl.sum(tl.load(PM2 + offs, mask=mask, other=0.0) + cnt[:, None] * d * d, axis=0)
    mean += tl.load(PMEAN + S * C + c, mask=cmask, other=0.0)
    if UPDATE_RUNNING:
        r_mean = tl.load(RMEAN + c, mask=cmask, other=0.0).to(ACC)
        r_var = tl.load(RVAR + c, mask=cmask, other=0.0).to(ACC)
        r_mean = momentum * mean + (1.0 - momentum) * r_mean
        r_var = momentum * (m2 / (M - 1.0)) + (1.0 - momentum) * r_var
        tl.store(RMEAN + c, r_mean.to(RMEAN.dtype.element_ty), mask=cmask)
        tl.store(RVAR + c, r_var.to(RVAR.dtype.element_ty), mask=cmask)
    tl.store(MEAN + c, mean, mask=cmask)
    tl.store(RSTD + c, 1.0 / tl.sqrt(m2 / M + eps), mask=cmask)


# out[n,c,p] = r[n,c,p] + max((z[n,c,p] − mean[c])·scale[n,c] + β[n,c], 0) for one sample n, channels c, positions p.
# MODE 0 reads the batch's mean/rstd (_finalize_stats_kernel), MODE 1 the running buffers (and the programs of
# sample 0, first position block, save mean/rstd for the backward), MODE 2 has mean = 0, scale = γ.
@triton.jit
def _forward_kernel(
    Z, R, Y, GAMMA, BETA, RMEAN, RVAR, MEAN, RSTD,
    C, HW, eps: tl.float64,
    s_zn, s_zc, s_zp, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp, s_gn, s_gc, s_bn, s_bc,
    MODE: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
    VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # eps arrives as float64 (a compiled kernel would otherwise get it as float32) and is rounded once to ACC.
    eps = tl.cast(eps, ACC)
    HW, s_zn, s_zc = aligned(HW, VEC), aligned(s_zn, VEC), aligned(s_zc, VEC)
    s_rn, s_rc, s_yn, s_yc = aligned(s_rn, VEC), aligned(s_rc, VEC), aligned(s_yn, VEC), aligned(s_yc, VEC)
    n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_p = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if MODE == 0:
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    elif MODE == 1:
        mean = tl.load(RMEAN + c, mask=cmask, other=0.0).to(ACC)
        rstd = 1.0 / tl.sqrt(tl.load(RVAR + c, mask=cmask, other=1.0).to(ACC) + eps)
        # sample 0's first position block writes them (a block-shaped mask: the interpreter mishandles scalar &
        # block masks)
        first = (0 * c + n + pid_p) == 0
        tl.store(MEAN + c, mean, mask=cmask & first)
        tl.store(RSTD + c, rstd, mask=cmask & first)
    # γ and β loaded after the statistics (fewer registers live through them)
    gamma = tl.load(GAMMA + n * s_gn + c * s_gc, mask=cmask, other=0.0).to(ACC)
    beta = tl.load(BETA + n * s_bn + c * s_bc, mask=cmask, other=0.0).to(ACC)
    scale = gamma if MODE == 2 else gamma * rstd
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cmask[:, None] & (p < HW)[None, :]
    n64 = tl.cast(n, tl.int64)
    z = tl.load(Z + n64 * s_zn + c[:, None] * s_zc + p[None, :] * s_zp, mask=mask, other=0.0).to(ACC)
    if MODE != 2:
        z -= mean[:, None]
    # NaN propagates as in torch.relu (max.f32 and the interpreter's default max would return 0 for a NaN)
    out = tl.maximum(tl.fma(z, scale[:, None], beta[:, None]), 0.0, propagate_nan=tl.PropagateNan.ALL)
    if HAS_RES:
        out += tl.load(R + n64 * s_rn + c[:, None] * s_rc + p[None, :] * s_rp, mask=mask, other=0.0).to(ACC)
    tl.store(Y + n64 * s_yn + c[:, None] * s_yc + p[None, :] * s_yp, out.to(Y.dtype.element_ty), mask=mask)


# Per (n, c) over split s's positions [pa, pb): dβ = Σ_p g, dγ = Σ_p g·x̂ with g = dout·[(z − mean)·scale + β > 0]
# (the forward's), stored to DGAMMA/DBETA[k, n, c] for chunk k = s % K (the outputs themselves when K = 1 and
# nothing else needs the sums: _backward); MODE 1/2 write dz = scale·g in the same pass.
@triton.jit
def _backward_reduce_kernel(
    DOUT, Z, GAMMA, BETA, MEAN, RSTD, DZ, DGAMMA, DBETA,
    N, C, HW, NPS, PPC, K,
    s_dn, s_dc, s_dp, s_zn, s_zc, s_zp, s_xn, s_xc, s_xp, s_gn, s_gc, s_bn, s_bc,
    MODE: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_C: tl.constexpr,
):  # fmt: skip
    HW, s_dn, s_dc, s_zn = aligned(HW, VEC), aligned(s_dn, VEC), aligned(s_dc, VEC), aligned(s_zn, VEC)
    s_zc, s_xn, s_xc = aligned(s_zc, VEC), aligned(s_xn, VEC), aligned(s_xc, VEC)
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # all true when C is a multiple of BLOCK_C (the model's 128): one predicate fewer per tile row, which triton
    # 3.6's code for sm_80 spilled (P2R + STL at 96 registers) in channels_last eval, and sm_80/sm_90 at 2×2 maps
    cmask = (c < C) | EVEN_C
    if MODE == 2:
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        rstd = tl.full([BLOCK_C], 1.0, dtype=ACC)
    else:
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    n0, n1, pa, pb = _split_range(pid_s, N, HW, NPS, PPC, K)
    out = (pid_s % K) * N * C
    for n in range(n0, n1):
        n64 = tl.cast(n, tl.int64)
        gamma = tl.load(GAMMA + n64 * s_gn + c * s_gc, mask=cmask, other=0.0).to(ACC)
        beta = tl.load(BETA + n64 * s_bn + c * s_bc, mask=cmask, other=0.0).to(ACC)
        scale = gamma * rstd
        d_beta = tl.zeros([BLOCK_C], dtype=ACC)
        d_gamma = tl.zeros([BLOCK_C], dtype=ACC)
        for p0 in range(pa, pb, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = cmask[:, None] & (p < pb)[None, :]
            z = tl.load(Z + n64 * s_zn + c[:, None] * s_zc + p[None, :] * s_zp, mask=mask, other=0.0).to(ACC)
            do = tl.load(DOUT + n64 * s_dn + c[:, None] * s_dc + p[None, :] * s_dp, mask=mask, other=0.0)
            z -= mean[:, None]
            g = tl.where(tl.fma(z, scale[:, None], beta[:, None]) <= 0.0, 0.0, do.to(ACC))  # as torch's
            x_hat = z * rstd[:, None]
            d_beta += tl.sum(g, axis=1)
            d_gamma += tl.sum(g * x_hat, axis=1)
            if MODE != 0:
                dz = g * scale[:, None]
                x_ptr = DZ + n64 * s_xn + c[:, None] * s_xc + p[None, :] * s_xp
                tl.store(x_ptr, dz.to(DZ.dtype.element_ty), mask=mask)
        tl.store(DGAMMA + out + n64 * C + c, d_gamma.to(DGAMMA.dtype.element_ty), mask=cmask)
        tl.store(DBETA + out + n64 * C + c, d_beta.to(DBETA.dtype.element_ty), mask=cmask)


# Once per channel block, after _backward_reduce_kernel wrote partial sums per position chunk k (float32):
#   dβ[n,c] = Σ_k dβ_k[n,c],   dγ[n,c] = Σ_k dγ_k[n,c]   (stored in γ's dtype);
#   with SUMS (training): A_c = Σ_n γ[n,c]·dβ[n,c] / M,   B_c = Σ_n γ[n,c]·dγ[n,c] / M   (from the float32 sums)
@triton.jit
def _finalize_sums_kernel(
    PGAMMA, PBETA, GAMMA, DGAMMA, DBETA, AB,
    N, C, K, M: tl.float64, s_gn, s_gc,
    SUMS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    M = tl.cast(M, ACC)  # float64 in, rounded once (as in _forward_kernel)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    a = tl.zeros([BLOCK_C], dtype=ACC)
    b = tl.zeros([BLOCK_C], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & cmask[None, :]
        offs = tl.cast(n, tl.int64)[:, None] * C + c[None, :]
        d_gamma = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
        d_beta = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
        for k in range(0, K):
            d_gamma += tl.load(PGAMMA + k * N * C + offs, mask=mask, other=0.0)
            d_beta += tl.load(PBETA + k * N * C + offs, mask=mask, other=0.0)
        tl.store(DGAMMA + offs, d_gamma.to(DGAMMA.dtype.element_ty), mask=mask)
        tl.store(DBETA + offs, d_beta.to(DBETA.dtype.element_ty), mask=mask)
        if SUMS:
            gamma = tl.load(GAMMA + n[:, None] * s_gn + c[None, :] * s_gc, mask=mask, other=0.0).to(ACC)
            a += tl.sum(gamma * d_beta, axis=0)
            b += tl.sum(gamma * d_gamma, axis=0)
    if SUMS:
        tl.store(AB + c, a / M, mask=cmask)
        tl.store(AB + C + c, b / M, mask=cmask)


# Training-mode input gradient: dz = rstd·(γ·g − A_c − x̂·B_c), A_c and B_c from _finalize_sums_kernel (÷ M there).
@triton.jit
def _backward_dz_kernel(
    DOUT, Z, GAMMA, BETA, MEAN, RSTD, AB, DZ,
    C, HW,
    s_dn, s_dc, s_dp, s_zn, s_zc, s_zp, s_xn, s_xc, s_xp, s_gn, s_gc, s_bn, s_bc,
    ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    HW, s_dn, s_dc, s_zn = aligned(HW, VEC), aligned(s_dn, VEC), aligned(s_dc, VEC), aligned(s_zn, VEC)
    s_zc, s_xn, s_xc = aligned(s_zc, VEC), aligned(s_xn, VEC), aligned(s_xc, VEC)
    n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_p = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    a = tl.load(AB + c, mask=cmask, other=0.0)
    b = tl.load(AB + C + c, mask=cmask, other=0.0)
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    gamma = tl.load(GAMMA + n * s_gn + c * s_gc, mask=cmask, other=0.0).to(ACC)
    beta = tl.load(BETA + n * s_bn + c * s_bc, mask=cmask, other=0.0).to(ACC)
    scale = gamma * rstd
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cmask[:, None] & (p < HW)[None, :]
    n64 = tl.cast(n, tl.int64)
    z = tl.load(Z + n64 * s_zn + c[:, None] * s_zc + p[None, :] * s_zp, mask=mask, other=0.0).to(ACC)
    do = tl.load(DOUT + n64 * s_dn + c[:, None] * s_dc + p[None, :] * s_dp, mask=mask, other=0.0)
    z -= mean[:, None]
    g = tl.where(tl.fma(z, scale[:, None], beta[:, None]) <= 0.0, 0.0, do.to(ACC))  # NaN passes, as torch's
    x_hat = z * rstd[:, None]
    dz = rstd[:, None] * (gamma[:, None] * g - a[:, None] - x_hat * b[:, None])
    x_ptr = DZ + n64 * s_xn + c[:, None] * s_xc + p[None, :] * s_xp
    tl.store(x_ptr, dz.to(DZ.dtype.element_ty), mask=mask)


# One program per channel c, training mode in one launch (at batch sizes where C programs suffice: _one_launch):
#   pass 1, as _stats_kernel over the whole batch as one split: tiles t of (samples × positions) in order, Chan's
#           combine of z − K (K = z[0, c, 0]);  mean = K + μ,  var = M2 / M,  rstd = 1 / √(var + eps);
#           running buffers updated, mean and rstd saved for the backward
#   pass 2, as _forward_kernel: out[n,c,p] = r[n,c,p] + max((z[n,c,p] − mean)·γ[n,c]·rstd + β[n,c], 0)
@triton.jit
def _one_launch_forward_kernel(
    Z, R, Y, GAMMA, BETA, RMEAN, RVAR, MEAN, RSTD,
    N, HW, M: tl.float64, momentum: tl.float64, eps: tl.float64,
    s_zn, s_zc, s_zp, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp, s_gn, s_gc, s_bn, s_bc,
    HAS_RES: tl.constexpr, UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr,
    VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    M, momentum, eps = tl.cast(M, ACC), tl.cast(momentum, ACC), tl.cast(eps, ACC)  # as in _forward_kernel
    HW, s_zn, s_zc = aligned(HW, VEC), aligned(s_zn, VEC), aligned(s_zc, VEC)
    s_rn, s_rc, s_yn, s_yc = aligned(s_rn, VEC), aligned(s_rc, VEC), aligned(s_yn, VEC), aligned(s_yc, VEC)
    c = tl.program_id(0)
    z_c = Z + c * s_zc
    pivot = tl.load(z_c).to(ACC)  # _pivot's K
    mean = tl.zeros([], dtype=ACC)
    m2 = tl.zeros([], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_off = tl.cast(n, tl.int64)[:, None] * s_zn
        for p0 in range(0, HW, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = ((n < N) | EVEN_N)[:, None] & (p < HW)[None, :]
            x = tl.load(z_c + n_off + p[None, :] * s_zp, mask=mask, other=pivot).to(ACC) - pivot
            rows = tl.minimum(N - n0, BLOCK_N)
            cnt = tl.cast(rows * tl.minimum(HW - p0, BLOCK_P), ACC)
            t_mean = tl.sum(x) / cnt
            d = tl.where(mask, x - t_mean, 0.0)
            mean, m2 = _chan(mean, m2, tl.cast(n0 * HW + rows * p0, ACC), t_mean, tl.sum(d * d), cnt)
    mean += pivot
    rstd = 1.0 / tl.sqrt(m2 / M + eps)
    if UPDATE_RUNNING:
        r_mean = momentum * mean + (1.0 - momentum) * tl.load(RMEAN + c).to(ACC)
        r_var = momentum * (m2 / (M - 1.0)) + (1.0 - momentum) * tl.load(RVAR + c).to(ACC)
        tl.store(RMEAN + c, r_mean.to(RMEAN.dtype.element_ty))
        tl.store(RVAR + c, r_var.to(RVAR.dtype.element_ty))
    tl.store(MEAN + c, mean)
    tl.store(RSTD + c, rstd)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = (n < N) | EVEN_N  # all true when BLOCK_N divides N (fewer predicates)
        n64 = tl.cast(n, tl.int64)[:, None]
        scale = tl.load(GAMMA + n * s_gn + c * s_gc, mask=nmask, other=0.0).to(ACC) * rstd
        beta = tl.load(BETA + n * s_bn + c * s_bc, mask=nmask, other=0.0).to(ACC)
        for p0 in range(0, HW, BLOCK_P):
            p = (p0 + tl.arange(0, BLOCK_P))[None, :]
            mask = nmask[:, None] & (p < HW)
            z = tl.load(z_c + n64 * s_zn + p * s_zp, mask=mask, other=0.0).to(ACC) - mean
            out = tl.maximum(tl.fma(z, scale[:, None], beta[:, None]), 0.0, propagate_nan=tl.PropagateNan.ALL)
            if HAS_RES:
                out += tl.load(R + n64 * s_rn + c * s_rc + p * s_rp, mask=mask, other=0.0).to(ACC)
            tl.store(Y + n64 * s_yn + c * s_yc + p * s_yp, out.to(Y.dtype.element_ty), mask=mask)


# One program per channel c, the training backward in one launch, with g = dout·[(z − mean)·γ·rstd + β > 0] and
# x̂ = (z − mean)·rstd as in _backward_reduce_kernel:
#   pass 1: dβ[n,c] = Σ_p g,  dγ[n,c] = Σ_p g·x̂ (stored);   A = Σ_n γ[n,c]·dβ[n,c] / M,  B = Σ_n γ[n,c]·dγ[n,c] / M
#   pass 2, as _backward_dz_kernel: dz = rstd·(γ·g − A − x̂·B)
@triton.jit
def _one_launch_backward_kernel(
    DOUT, Z, GAMMA, BETA, MEAN, RSTD, DZ, DGAMMA, DBETA,
    N, C, HW, M: tl.float64,
    s_dn, s_dc, s_dp, s_zn, s_zc, s_zp, s_xn, s_xc, s_xp, s_gn, s_gc, s_bn, s_bc,
    ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    M = tl.cast(M, ACC)  # float64 in, rounded once (as in _forward_kernel)
    HW, s_dn, s_dc, s_zn = aligned(HW, VEC), aligned(s_dn, VEC), aligned(s_dc, VEC), aligned(s_zn, VEC)
    s_zc, s_xn, s_xc = aligned(s_zc, VEC), aligned(s_xn, VEC), aligned(s_xc, VEC)
    c = tl.program_id(0)
    mean = tl.load(MEAN + c)
    rstd = tl.load(RSTD + c)
    a = tl.zeros([], dtype=ACC)
    b = tl.zeros([], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = (n < N) | EVEN_N  # all true when BLOCK_N divides N (fewer predicates)
        n64 = tl.cast(n, tl.int64)[:, None]
        gamma = tl.load(GAMMA + n * s_gn + c * s_gc, mask=nmask, other=0.0).to(ACC)
        beta = tl.load(BETA + n * s_bn + c * s_bc, mask=nmask, other=0.0).to(ACC)
        scale = gamma * rstd
        d_beta = tl.zeros([BLOCK_N], dtype=ACC)
        d_gamma = tl.zeros([BLOCK_N], dtype=ACC)
        for p0 in range(0, HW, BLOCK_P):
            p = (p0 + tl.arange(0, BLOCK_P))[None, :]
            mask = nmask[:, None] & (p < HW)
            z = tl.load(Z + n64 * s_zn + c * s_zc + p * s_zp, mask=mask, other=0.0).to(ACC) - mean
            do = tl.load(DOUT + n64 * s_dn + c * s_dc + p * s_dp, mask=mask, other=0.0)
            g = tl.where(tl.fma(z, scale[:, None], beta[:, None]) <= 0.0, 0.0, do.to(ACC))  # as torch's
            d_beta += tl.sum(g, axis=1)
            d_gamma += tl.sum(g * (z * rstd), axis=1)
        tl.store(DGAMMA + n * C + c, d_gamma.to(DGAMMA.dtype.element_ty), mask=nmask)
        tl.store(DBETA + n * C + c, d_beta.to(DBETA.dtype.element_ty), mask=nmask)
        a += tl.sum(gamma * d_beta)
        b += tl.sum(gamma * d_gamma)
    a /= M
    b /= M
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = (n < N) | EVEN_N  # all true when BLOCK_N divides N (fewer predicates)
        n64 = tl.cast(n, tl.int64)[:, None]
        gamma = tl.load(GAMMA + n * s_gn + c * s_gc, mask=nmask, other=0.0).to(ACC)[:, None]
        beta = tl.load(BETA + n * s_bn + c * s_bc, mask=nmask, other=0.0).to(ACC)[:, None]
        for p0 in range(0, HW, BLOCK_P):
            p = (p0 + tl.arange(0, BLOCK_P))[None, :]
            mask = nmask[:, None] & (p < HW)
            z = tl.load(Z + n64 * s_zn + c * s_zc + p * s_zp, mask=mask, other=0.0).to(ACC) - mean
            do = tl.load(DOUT + n64 * s_dn + c * s_dc + p * s_dp, mask=mask, other=0.0)
            g = tl.where(tl.fma(z, gamma * rstd, beta) <= 0.0, 0.0, do.to(ACC))  # NaN passes, as torch's
            dz = rstd * (gamma * g - a - (z * rstd) * b)
            tl.store(DZ + n64 * s_xn + c * s_xc + p * s_xp, dz.to(DZ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _tile(c: int, hw: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of about BN_TILE elements, long along the dimension that is contiguous in memory."""
    if channels_last:
        block_c = min(next_power_of_2(c), 64)
        block_p = min(next_power_of_2(hw), max(1, BN_TILE // block_c))
    else:
        block_p = min(next_power_of_2(hw), BN_TILE)
        block_c = min(next_power_of_2(c), max(1, BN_TILE // block_p))
    return block_c, block_p


def _one_launch(m: int) -> bool:
    """Training mode in one launch each way (one program per channel over the whole batch) rather than the split
    path: when M = N·H·W ≤ BN_ONE_LAUNCH_MAX_M, unless a test forces a path (_common.BN_ONE_LAUNCH)."""
    forced = _common.BN_ONE_LAUNCH
    return m <= BN_ONE_LAUNCH_MAX_M if forced is None else forced


def _one_launch_tile(n: int, hw: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_P) of the one-launch kernels: about BN_ONE_LAUNCH_TILE elements of one channel (half that in
    channels_last, where every element is its own load with its own address and mask: 8 per thread, not 16), all
    of a sample's positions (up to the tile) and as many samples as fit."""
    tile = BN_ONE_LAUNCH_TILE // 2 if channels_last else BN_ONE_LAUNCH_TILE
    block_p = min(next_power_of_2(hw), tile)
    return min(next_power_of_2(n), max(1, tile // block_p)), block_p


class SplitPlan(NamedTuple):
    """How the split path's reductions divide a channel block's N·H·W values: `splits` = ⌈N / nps⌉ groups of
    `nps` samples × `chunks` chunks of `ppc` positions (chunks = 1, ppc ≥ H·W: whole samples)."""

    nps: int
    ppc: int
    chunks: int
    splits: int


def _split_plan(n: int, c: int, hw: int, block_c: int, block_p: int, device: torch.device) -> SplitPlan:
    """Splits for channel blocks × splits ≈ BN_SPLIT_PROGRAMS_PER_SM × the SMs (a whole GPU streaming: at the
    stem's 112², a split per sample would give 64 samples × 2 channel blocks = 128 programs, 1 per SM), none
    under BN_MIN_TILES_PER_SPLIT tiles; one split when there are no SMs to fill (the interpreter).
    _common.BN_SPLIT forces (samples per split, position tiles per chunk), any combination of the two."""
    tiles = cdiv(hw, block_p)  # position tiles of one sample
    if _common.BN_SPLIT is not None:
        nps, tpc = _common.BN_SPLIT[0], min(_common.BN_SPLIT[1], tiles)
    else:
        programs = BN_SPLIT_PROGRAMS_PER_SM * sm_count(device)
        want = max(1, programs // cdiv(c, block_c))
        per_split = max(BN_MIN_TILES_PER_SPLIT, cdiv(n * tiles, want))
        if per_split >= tiles:  # groups of whole samples, as even as they come
            nps, tpc = cdiv(n, cdiv(n, per_split // tiles)), tiles
        else:  # each sample in chunks of positions, as even as they come
            nps, tpc = 1, cdiv(tiles, cdiv(tiles, per_split))
    nps = min(nps, n)
    chunks = cdiv(tiles, tpc)
    return SplitPlan(nps, tpc * block_p, chunks, cdiv(n, nps) * chunks)


def _strides(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    s = t.stride()
    return s[0], s[1], hw_stride(t, name)


def _forward(z, gamma, beta, residual, running_mean, running_var, mode, momentum, eps):
    n, c, h, w = z.shape
    hw, m = h * w, n * h * w
    acc = acc_dtype(z.dtype, gamma.dtype, beta.dtype, residual.dtype if residual is not None else z.dtype)
    cl = is_channels_last(z)
    block_c, block_p = _tile(c, hw, cl)
    y = empty_like_layout(tuple(z.shape), z, z.dtype)
    mean = torch.empty(c, device=z.device, dtype=acc)
    rstd = torch.empty(c, device=z.device, dtype=acc)
    res = residual if residual is not None else z
    update = mode == MODE_BATCH_STATS and running_mean is not None
    if mode == MODE_BATCH_STATS and _one_launch(m):
        block_n, block_p = _one_launch_tile(n, hw, cl)
        _one_launch_forward_kernel[(c,)](
            z, res, y, gamma, beta, running_mean if update else mean, running_var if update else rstd, mean, rstd,
            n, hw, float(m), float(momentum), float(eps),
            *_strides(z, "z"), *_strides(res, "residual"), *_strides(y, "out"),
            *gamma.stride(), *beta.stride(),
            HAS_RES=residual is not None, UPDATE_RUNNING=update, ACC=TL_DTYPE[acc], VEC=vec_hint(hw, z, res, y),
            BLOCK_N=block_n, BLOCK_P=block_p, EVEN_N=n % block_n == 0, num_warps=BN_ONE_LAUNCH_NUM_WARPS,
        )  # fmt: skip
        return y, mean, rstd
    if mode == MODE_BATCH_STATS:
        plan = _split_plan(n, c, hw, block_c, block_p, z.device)
        p_mean = torch.empty((plan.splits + 1, c), device=z.device, dtype=acc)  # + the pivots
        p_m2 = torch.empty((plan.splits, c), device=z.device, dtype=acc)
        _stats_kernel[(cdiv(c, block_c), plan.splits)](
            z, p_mean, p_m2, n, c, hw, plan.nps, plan.ppc, plan.chunks, *_strides(z, "z"),
            ACC=TL_DTYPE[acc], VEC=vec_hint(hw, z), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=BN_NUM_WARPS,
        )  # fmt: skip
        _finalize_stats_kernel[(cdiv(c, BN_FINALIZE_BLOCK_C),)](
            p_mean, p_m2, running_mean if update else mean, running_var if update else rstd, mean, rstd,
            n, c, hw, plan.splits, plan.nps, plan.ppc, plan.chunks, float(m), float(momentum), float(eps),
            UPDATE_RUNNING=update, ACC=TL_DTYPE[acc],
            BLOCK_S=min(next_power_of_2(plan.splits), BN_FINALIZE_BLOCK_S), BLOCK_C=BN_FINALIZE_BLOCK_C,
            num_warps=BN_NUM_WARPS, num_stages=1,
        )  # fmt: skip
    _forward_kernel[(n, cdiv(c, block_c), cdiv(hw, block_p))](
        z, res, y, gamma, beta,
        running_mean if running_mean is not None else mean, running_var if running_var is not None else rstd,
        mean, rstd, c, hw, float(eps),
        *_strides(z, "z"), *_strides(res, "residual"), *_strides(y, "out"),
        *gamma.stride(), *beta.stride(),
        MODE=mode, HAS_RES=residual is not None, ACC=TL_DTYPE[acc],
        VEC=vec_hint(hw, z, res, y), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=BN_NUM_WARPS,
    )  # fmt: skip
    return y, mean, rstd


def _backward(dout, z, gamma, beta, mean, rstd, mode, need_dz=True):
    """dz (None when z needs no gradient), dγ, dβ and the residual's gradient (dout itself) of `_forward`."""
    try:
        _strides(dout, "grad_output")
    except ValueError:
        # The incoming gradient's layout is not ours to choose; an exotic one costs one explicit copy.
        dout = dout.contiguous()
    n, c, h, w = z.shape
    # Training without dz (z needs no gradient: a frozen visual network) skips the dz pass; the reduction writes
    # no dz in training, so z stands in for the pointer. Eval / no BN write dz in the reduction anyway.
    skip_dz = mode == MODE_BATCH_STATS and not need_dz
    dz = z if skip_dz else empty_like_layout(tuple(z.shape), z, z.dtype)
    d_gamma = torch.empty((n, c), device=z.device, dtype=gamma.dtype)
    d_beta = torch.empty((n, c), device=z.device, dtype=beta.dtype)
    if mode == MODE_BATCH_STATS and not skip_dz and _one_launch(n * h * w):
        _backward_one_launch(dout, z, gamma, beta, mean, rstd, dz, d_gamma, d_beta)
    else:
        _backward_split(dout, z, gamma, beta, mean, rstd, mode, dz, d_gamma, d_beta, sums=not skip_dz)
    return None if skip_dz else dz, d_gamma, d_beta, dout


def _common_strides(dout, z, dz, gamma, beta) -> tuple:
    """The stride arguments every backward kernel takes, in its order."""
    return (
        *_strides(dout, "grad_output"), *_strides(z, "z"), *_strides(dz, "dz"),
        *gamma.stride(), *beta.stride(),
    )  # fmt: skip


def _backward_one_launch(dout, z, gamma, beta, mean, rstd, dz, d_gamma, d_beta) -> None:
    """Training mode, a channel's N·H·W values in one program: dz, dγ, dβ in one launch."""
    n, c, h, w = z.shape
    hw = h * w
    block_n, block_p = _one_launch_tile(n, hw, is_channels_last(z))
    _one_launch_backward_kernel[(c,)](
        dout, z, gamma, beta, mean, rstd, dz, d_gamma, d_beta, n, c, hw, float(n * hw),
        *_common_strides(dout, z, dz, gamma, beta),
        ACC=TL_DTYPE[mean.dtype], VEC=vec_hint(hw, dout, z, dz), BLOCK_N=block_n, BLOCK_P=block_p,
        EVEN_N=n % block_n == 0, num_warps=BN_ONE_LAUNCH_NUM_WARPS,
    )  # fmt: skip


def _backward_split(dout, z, gamma, beta, mean, rstd, mode, dz, d_gamma, d_beta, sums: bool) -> None:
    """The split path: per-split partial sums of dγ, dβ (and dz in eval / no BN), summed by
    _finalize_sums_kernel; in training (`sums`: dz wanted) A_c, B_c from those sums, then a dz pass."""
    n, c, h, w = z.shape
    hw, acc = h * w, mean.dtype
    block_c, block_p = _tile(c, hw, is_channels_last(z))
    vec = vec_hint(hw, dout, z, dz)
    common = _common_strides(dout, z, dz, gamma, beta)
    plan = _split_plan(n, c, hw, block_c, block_p, z.device)
    sums = mode == MODE_BATCH_STATS and sums  # dz needs A_c, B_c
    # The sums straight into dγ/dβ when every (n, c) has one split and nothing else needs them; else float32
    # partials per position chunk, summed (and A_c, B_c formed) by _finalize_sums_kernel.
    direct = plan.chunks == 1 and not sums
    if direct:
        p_gamma, p_beta = d_gamma, d_beta
    else:
        p_gamma = torch.empty((plan.chunks, n, c), device=z.device, dtype=acc)
        p_beta = torch.empty((plan.chunks, n, c), device=z.device, dtype=acc)
    _backward_reduce_kernel[(cdiv(c, block_c), plan.splits)](
        dout, z, gamma, beta, mean, rstd, dz, p_gamma, p_beta, n, c, hw, plan.nps, plan.ppc, plan.chunks, *common,
        MODE=mode, ACC=TL_DTYPE[acc], VEC=vec, BLOCK_C=block_c, BLOCK_P=block_p, EVEN_C=c % block_c == 0,
        num_warps=BN_NUM_WARPS,
    )  # fmt: skip
    if not direct:
        ab = torch.empty((2, c), device=z.device, dtype=acc) if sums else mean  # placeholder when unused
        _finalize_sums_kernel[(cdiv(c, BN_FINALIZE_BLOCK_C),)](
            p_gamma, p_beta, gamma, d_gamma, d_beta, ab, n, c, plan.chunks, float(n * hw),
            gamma.stride(0), gamma.stride(1), SUMS=sums, ACC=TL_DTYPE[acc],
            BLOCK_N=min(next_power_of_2(n), BN_FINALIZE_BLOCK_N), BLOCK_C=BN_FINALIZE_BLOCK_C,
            num_warps=BN_NUM_WARPS, num_stages=1,
        )  # fmt: skip
    if sums:
        _backward_dz_kernel[(n, cdiv(c, block_c), cdiv(hw, block_p))](
            dout, z, gamma, beta, mean, rstd, ab, dz, c, hw, *common,
            ACC=TL_DTYPE[acc], VEC=vec, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=BN_NUM_WARPS,
        )  # fmt: skip


class BnFilmReluFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; saves z, γ, β and the per-channel mean/rstd (not x̂)."""

    @staticmethod
    def forward(ctx, z, gamma, beta, residual, running_mean, running_var, mode, momentum, eps):
        y, mean, rstd = _forward(z, gamma, beta, residual, running_mean, running_var, mode, momentum, eps)
        ctx.save_for_backward(z, gamma, beta, mean, rstd)
        ctx.mode = mode
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return y

    @staticmethod
    def backward(ctx, dout):
        no_double_backward("bn_film_relu")
        z, gamma, beta, mean, rstd = ctx.saved_tensors
        dz, d_gamma, d_beta, dr = _backward(
            dout, z, gamma, beta, mean, rstd, ctx.mode, ctx.needs_input_grad[0]
        )
        if ctx.residual_dtype is not None:
            dr = dr.to(ctx.residual_dtype)
        else:
            dr = None
        return dz, d_gamma, d_beta, dr, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------

_compiled_reference = None


def _check(z, gamma, beta, residual, running_mean, running_var, training, normalize, momentum, eps) -> None:
    tensors = dict(z=z, gamma=gamma, beta=beta, residual=residual, running_mean=running_mean)
    check_tensors("bn_film_relu", **tensors, running_var=running_var)
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            hint = " (nn.BatchNorm's momentum=None, a cumulative average, is 1 / num_batches_tracked)"
            raise TypeError(
                f"bn_film_relu: {name} must be a number, got {value!r}" + (hint if name == "momentum" else "")
            )
    if z.dim() != 4:
        raise ValueError(f"bn_film_relu: z must be [N, C, H, W], got shape {tuple(z.shape)}")
    n, c, h, w = z.shape
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (n, c):
            raise ValueError(f"bn_film_relu: {name} must be [N, C] = {(n, c)}, got {tuple(t.shape)}")
    if residual is not None and residual.shape != z.shape:
        raise ValueError(f"bn_film_relu: residual shape {tuple(residual.shape)} != z shape {tuple(z.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_film_relu: pass both running_mean and running_var, or neither")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"bn_film_relu: {name} must be [C] = [{c}], got {tuple(t.shape)}")
        if t is not None and c > 1 and t.stride(0) != 1:
            raise ValueError(f"bn_film_relu: {name} must have stride 1 (updated in place), got {t.stride(0)}")
    if normalize and not training and running_mean is None:
        raise ValueError("bn_film_relu: eval mode (training=False) needs running_mean and running_var")
    if normalize and training and n * h * w <= 1:
        raise ValueError(
            f"bn_film_relu: expected more than 1 value per channel when training, got {tuple(z.shape)}"
        )


def bn_film_relu(
    z: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    normalize: bool = True,
    impl: str = "triton",
) -> torch.Tensor:
    """`residual + relu(γ·BN(z) + β)` with an affine-free BatchNorm2d, as one fused op.

    z: [N, C, H, W] (contiguous NCHW or channels_last); gamma, beta: [N, C] (any dtype; any strides);
    residual: like z, or None; running_mean / running_var: [C] buffers updated in place in training (as
    nn.BatchNorm2d: momentum, unbiased variance), used in eval; None in training means batch statistics only.
    normalize=False skips BN (the "no BN" ablation). The output has z's dtype and layout; statistics and sums
    are float32. impl: "triton" (fused kernels), "reference" (plain PyTorch), "compile" (torch.compile of it).
    """
    _check(z, gamma, beta, residual, running_mean, running_var, training, normalize, momentum, eps)
    if impl == "reference":
        return bn_film_relu_reference(
            z, gamma, beta, residual, running_mean, running_var,
            training=training, momentum=momentum, eps=eps, normalize=normalize,
        )  # fmt: skip
    if impl == "compile":
        global _compiled_reference
        if _compiled_reference is None:
            _compiled_reference = torch.compile(bn_film_relu_reference, dynamic=False)
        return _compiled_reference(
            z, gamma, beta, residual, running_mean, running_var,
            training=training, momentum=momentum, eps=eps, normalize=normalize,
        )  # fmt: skip
    if impl != "triton":
        raise ValueError(f"bn_film_relu: impl must be 'triton', 'reference' or 'compile', got '{impl}'")
    check_device(z, gamma, beta, residual, running_mean, running_var)
    for name, t in (("z", z), ("residual", residual)):
        if t is not None:
            hw_stride(t, name)
    mode = MODE_NO_NORM if not normalize else (MODE_BATCH_STATS if training else MODE_RUNNING_STATS)
    return BnFilmReluFunction.apply(z, gamma, beta, residual, running_mean, running_var, mode, momentum, eps)
