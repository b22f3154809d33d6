"""A one-layer GRU over packed questions for the CPU, with the hidden-weight gradient as one GEMM.

PyTorch's CPU GRU (no cuDNN) is unrolled by autograd: its backward computes, at every time step, a full
[3H, H] gradient of the hidden-to-hidden weights (`dG_tᵀ·h_{t-1}`, 201 MB in float32 for the paper's H = 4096)
and adds it into the running sum: about three passes over 201 MB per step, on top of the one pass the step's
`dG_t·W_hh` needs. Here the backward keeps every step's gate gradients and multiplies them once:
`dW_hh = Σ_t dG_tᵀ h_{t-1} = DGᵀ·H_prev`, one GEMM over all steps (likewise `dW_ih`, `dX` and the biases).
The forward computes the input projections of all steps in one GEMM as PyTorch's CPU GRU does.

The maths is PyTorch's GRU (gates r, z, n in that order; `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`,
`h' = (h − n) ⊙ z + n`), h₀ = 0 (so step 0's hidden projection is its bias: no product with zeros, forward or
backward), read over a `PackedSequence`'s time-major data; it returns the state after
each sequence's last token (h_n), in the packed (length-sorted) order. Under CPU autocast the matmuls run in
the autocast dtype and the gates and states stay in float32. `FiLMGen` uses it on the CPU for a
unidirectional one-layer GRU; everything else (GPU: cuDNN; LSTM; bidirectional; several layers) runs
`nn.GRU`/`nn.LSTM` on the packed sequence.
"""

from __future__ import annotations

import torch


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _PackedGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, mm_dtype):  # noqa: D102 (see module doc)
        sizes = batch_sizes.tolist()
        hid = w_hh.shape[1]
        sd = _state_dtype(x.dtype if mm_dtype is None else w_hh.dtype)
        cd = sd if mm_dtype is None else mm_dtype
        w_hh_c = w_hh.to(cd)
        gi = torch.addmm(b_ih.to(cd), x.to(cd), w_ih.to(cd).t()).to(sd)  # all steps' input projections
        n_rows = x.shape[0]
        h_prev = x.new_empty(n_rows, hid, dtype=sd)  # the state each packed row's step started from
        r_all, z_all, n_all, ghn_all = (x.new_empty(n_rows, hid, dtype=sd) for _ in range(4))
        h_last = x.new_empty(sizes[0], hid, dtype=sd)
        h = x.new_zeros(sizes[0], hid, dtype=sd)
        off = 0
        for t, b in enumerate(sizes):
            h = h[:b]
            if t == 0:  # h0 = 0: the hidden projection is the bias (no product with zeros)
                gh = b_hh.to(cd).to(sd).expand(b, 3 * hid)
            else:
                gh = torch.addmm(b_hh.to(cd), h.to(cd), w_hh_c.t()).to(sd)
            g = gi[off : off + b]
            r = torch.sigmoid(g[:, :hid] + gh[:, :hid])
            z = torch.sigmoid(g[:, hid : 2 * hid] + gh[:, hid : 2 * hid])
            ghn = gh[:, 2 * hid :]
            n = torch.tanh(g[:, 2 * hid :] + r * ghn)
            h_prev[off : off + b] = h
            r_all[off : off + b], z_all[off : off + b], n_all[off : off + b] = r, z, n
            ghn_all[off : off + b] = ghn
            h = (h - n) * z + n
            nxt = sizes[t + 1] if t + 1 < len(sizes) else 0
            h_last[nxt:b] = h[nxt:b]  # the sequences whose last token this step was
            off += b
        ctx.save_for_backward(x, w_ih, w_hh, h_prev, r_all, z_all, n_all, ghn_all)
        ctx.sizes, ctx.cd, ctx.sd = sizes, cd, sd
        ctx.w_hh_c = w_hh_c  # the weights in the matmul dtype: cast once per step of training, not twice
        return h_last

    @staticmethod
    def backward(ctx, grad_last):  # noqa: D102
        x, w_ih, w_hh, h_prev, r_all, z_all, n_all, ghn_all = ctx.saved_tensors
        sizes, cd, sd = ctx.sizes, ctx.cd, ctx.sd
        hid = w_hh.shape[1]
        w_hh_c = ctx.w_hh_c
        dgi = torch.empty(x.shape[0], 3 * hid, dtype=sd, device=x.device)
        dgh = torch.empty_like(dgi)
        dh = torch.zeros(sizes[0], hid, dtype=sd, device=x.device)
        grad_last = grad_last.to(sd)
        offs = [0]
        for b in sizes:
            offs.append(offs[-1] + b)
        for t in range(len(sizes) - 1, -1, -1):
            b, off = sizes[t], offs[t]
            nxt = sizes[t + 1] if t + 1 < len(sizes) else 0
            dh[nxt:b] = grad_last[nxt:b]  # sequences ending at this step: their gradient starts here
            d = dh[:b]
            r, z, n = r_all[off : off + b], z_all[off : off + b], n_all[off : off + b]
            hp, ghn = h_prev[off : off + b], ghn_all[off : off + b]
            dn = d * (1 - z) * (1 - n * n)
            dz = d * (hp - n) * z * (1 - z)
            dr = dn * ghn * r * (1 - r)
            dgi[off : off + b, :hid] = dr
            dgi[off : off + b, hid : 2 * hid] = dz
            dgi[off : off + b, 2 * hid :] = dn
            dgh[off : off + b, :hid] = dr
            dgh[off : off + b, hid : 2 * hid] = dz
            dgh[off : off + b, 2 * hid :] = dn * r
            if t > 0:  # the gradient of h0 is not needed
                dh[:b] = d * z + torch.mm(dgh[off : off + b].to(cd), w_hh_c).to(sd)
        dgi_c, dgh_c = dgi.to(cd), dgh.to(cd)
        first = sizes[0]  # step 0 multiplied h0 = 0: no weight gradient from it
        dx = torch.mm(dgi_c, w_ih.to(cd)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw_ih = torch.mm(dgi_c.t(), x.to(cd)).to(w_ih.dtype)
        dw_hh = torch.mm(dgh_c[first:].t(), h_prev[first:].to(cd)).to(w_hh.dtype)
        return dx, None, dw_ih, dw_hh, dgi.sum(0).to(w_ih.dtype), dgh.sum(0).to(w_hh.dtype), None


def packed_gru_last(rnn: torch.nn.GRU, packed: torch.nn.utils.rnn.PackedSequence) -> torch.Tensor:
    """h_n [N, H] of a one-layer unidirectional `nn.GRU` over `packed`, in the batch's order (as `rnn(packed)`
    returns it), computed by `_PackedGRU` with `rnn`'s own parameters."""
    mm_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    with torch.autocast("cpu", enabled=False):
        h = _PackedGRU.apply(
            packed.data,
            packed.batch_sizes,
            rnn.weight_ih_l0,
            rnn.weight_hh_l0,
            rnn.bias_ih_l0,
            rnn.bias_hh_l0,
            mm_dtype,
        )
    if packed.unsorted_indices is not None:
        h = h.index_select(0, packed.unsorted_indices)
    return h
