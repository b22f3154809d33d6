"""A GRU over a padded batch as a loop of matrix products: the experiment behind `gpu_step.py`'s `graph_cl_gru_loop`.

Why: the paper step's floor (bench/roofline.py) is 57% question encoder at batch 64, and there each of the 46
recurrent steps is a [64, 4096] × [4096, 12288] product bound by reading the 101 MB of hidden weights (21 µs at
HBM speed). On the 2026-12-04 H200 profile cuDNN's RNN took ~4.0 ms (its float16 GEMMs and cells among the top
25 kernels) against a 2.2 ms floor; its largest GEMM kernel ran 24 times a step at 82 µs each. Why it is slower
only a GPU can say (skinny products on too few tiles is a guess). Launched one by one, a loop of 92 products would
be slower still; inside graph mode's CUDA graph its launches cost nothing, and cuBLAS picks its own kernels for
the skinny shapes. Under bf16 autocast its products run in bf16 with float32 gates and states, where cuDNN's RNN
runs in float16 unscaled (README, "Precision"): if it is as fast, it also settles that question.

Each step's elementwise work (the gates, the new state; backward their gradients) is one function, compiled by
torch.compile on a GPU into one fused kernel: a loop of separate elementwise ops would launch ~50 kernels a step,
~2,300 a training step, which even a CUDA graph pays a few µs each. So a step is two kernels forward (product,
cell) and two backward.

The maths is `nn.GRU`'s (gates r, z, n; `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`, `h' = (h − n) ⊙ z + n`),
h₀ = 0, batch first, every position of the padded batch read (what `FiLMGen.static_encode` asks of cuDNN). The
input projections of all steps are one product, as are the weight gradients (`dW_hh = Σ_t dG_tᵀ h_{t-1}`), as in
fastfilm/gru.py (the CPU's packed GRU); no host synchronisation, static shapes: capturable.
"""

from __future__ import annotations

import torch


def _dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(the products' dtype, the gates' and states' dtype) for `x` under the current autocast state."""
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device.type
    mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else state
    return mm, state


def _cell_forward(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor):
    """One step's gates and new state from its input and hidden projections ([N, 3H], any dtype) and h [N, H]."""
    hid = h.shape[1]
    gi, gh = gi.to(h.dtype), gh.to(h.dtype)
    r = torch.sigmoid(gi[:, :hid] + gh[:, :hid])
    z = torch.sigmoid(gi[:, hid : 2 * hid] + gh[:, hid : 2 * hid])
    ghn = gh[:, 2 * hid :]
    n = torch.tanh(gi[:, 2 * hid :] + r * ghn)
    return (h - n) * z + n, r, z, n, ghn


def _cell_backward(carry, through, grad, r, z, n, hp, ghn):
    """One step's gate gradients: the state's gradient is `carry + through + grad` (the previous step's d·z, its
    product with W_hh, this position's output gradient). Returns (dG_input [N, 3H], dG_hidden [N, 3H], d·z)."""
    d = carry + through.to(carry.dtype) + grad
    dn = d * (1 - z) * (1 - n * n)
    dz = d * (hp - n) * z * (1 - z)
    dr = dn * ghn * r * (1 - r)
    return torch.cat([dr, dz, dn], 1), torch.cat([dr, dz, dn * r], 1), d * z


_COMPILED: dict[str, tuple] = {}


def _cells(backend: str | None):
    """The two cell functions, eager (None) or under torch.compile with `backend` (fullgraph, static shapes)."""
    if backend is None:
        return _cell_forward, _cell_backward
    if backend not in _COMPILED:
        _COMPILED[backend] = tuple(
            torch.compile(f, backend=backend, fullgraph=True, dynamic=False)
            for f in (_cell_forward, _cell_backward)
        )
    return _COMPILED[backend]


class _LoopGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, mm, sd, backend):  # noqa: D102 (see the module's docstring)
        n, t, _ = x.shape
        hid = w_hh.shape[1]
        fwd, _ = _cells(backend)
        x_tm = x.transpose(0, 1).to(mm).contiguous()  # [T, N, E], time-major
        w_hh_c, b_hh_c = w_hh.to(mm), b_hh.to(mm)
        gi = torch.addmm(b_ih.to(mm), x_tm.view(t * n, -1), w_ih.to(mm).t()).view(t, n, 3 * hid)
        h = x.new_zeros(n, hid, dtype=sd)
        saved = []  # per step: h_prev, r, z, n, ghn; stacked once at the end
        for s in range(t):
            # h0 = 0: step 0's hidden projection is the bias (no product with zeros)
            gh = b_hh_c.expand(n, 3 * hid) if s == 0 else torch.addmm(b_hh_c, h.to(mm), w_hh_c.t())
            h_new, r, z, nn_, ghn = fwd(gi[s], gh, h)
            saved.append((h, r, z, nn_, ghn))
            h = h_new
        h_prev, r_all, z_all, n_all, ghn_all = (torch.stack(v) for v in zip(*saved))
        out = torch.cat([h_prev[1:], h.unsqueeze(0)])  # the state after each step: [T, N, H]
        ctx.save_for_backward(x_tm, w_ih, w_hh, h_prev, r_all, z_all, n_all, ghn_all)
        ctx.w_hh_c, ctx.mm, ctx.sd, ctx.x_dtype, ctx.backend = w_hh_c, mm, sd, x.dtype, backend
        return out.transpose(0, 1)  # [N, T, H]

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x_tm, w_ih, w_hh, h_prev, r_all, z_all, n_all, ghn_all = ctx.saved_tensors
        mm, sd, w_hh_c = ctx.mm, ctx.sd, ctx.w_hh_c
        _, bwd = _cells(ctx.backend)
        t, n, hid = h_prev.shape
        g_tm = grad_out.transpose(0, 1).to(sd)  # [T, N, H]
        carry = through = x_tm.new_zeros(n, hid, dtype=sd)
        dgi, dgh = [None] * t, [None] * t
        for s in range(t - 1, -1, -1):
            dgi[s], dgh[s], carry = bwd(
                carry, through, g_tm[s], r_all[s], z_all[s], n_all[s], h_prev[s], ghn_all[s]
            )
            if s > 0:  # the gradient of h0 is not needed
                through = torch.mm(dgh[s].to(mm), w_hh_c)
        dgi, dgh = torch.stack(dgi), torch.stack(dgh)  # [T, N, 3H]
        dgi_c = dgi.view(t * n, 3 * hid).to(mm)
        dgh_c = dgh[1:].reshape((t - 1) * n, 3 * hid).to(mm)  # step 0 multiplied h0 = 0
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dgi_c, w_ih.to(mm)).view(t, n, -1).transpose(0, 1).to(ctx.x_dtype)
        dw_ih = torch.mm(dgi_c.t(), x_tm.view(t * n, -1)).to(w_ih.dtype)
        dw_hh = torch.mm(dgh_c.t(), h_prev[1:].reshape((t - 1) * n, hid).to(mm)).to(w_hh.dtype)
        db_ih = dgi.sum((0, 1)).to(w_ih.dtype)
        db_hh = dgh.sum((0, 1)).to(w_hh.dtype)
        return dx, dw_ih, dw_hh, db_ih, db_hh, None, None, None


def loop_gru(rnn: torch.nn.GRU, x: torch.Tensor, compile_backend: str | None = None) -> torch.Tensor:
    """`rnn(x)[0]` for a one-layer unidirectional, batch-first `nn.GRU` with biases and h₀ = 0: its output at
    every position [N, T, H], in float32 (float64 for float64 input), computed as a loop of products.
    `compile_backend`: torch.compile's backend for the per-step cell functions (None: eager)."""
    if not (isinstance(rnn, torch.nn.GRU) and rnn.num_layers == 1 and not rnn.bidirectional and rnn.bias):
        raise ValueError("loop_gru: a one-layer unidirectional nn.GRU with biases only")
    if not rnn.batch_first:
        raise ValueError("loop_gru: batch_first GRUs only")
    mm, sd = _dtypes(x)
    with torch.autocast(x.device.type, enabled=False):
        return _LoopGRU.apply(
            x, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, mm, sd, compile_backend
        )


def use_loop_gru(generator: torch.nn.Module, compile_backend: str | None = "auto") -> None:
    """Make `generator.encoder_rnn(x)` (what `FiLMGen.static_encode` calls) run `loop_gru` on this instance.
    `compile_backend="auto"`: inductor on a GPU, eager cells elsewhere."""
    rnn = generator.encoder_rnn
    if compile_backend == "auto":
        compile_backend = "inductor" if rnn.weight_hh_l0.is_cuda else None
    with torch.no_grad():  # refuse an unsupported RNN now, not at the first step
        loop_gru(rnn, rnn.weight_ih_l0.new_zeros(1, 1, rnn.input_size))
    rnn.forward = lambda x, hx=None: (loop_gru(rnn, x, compile_backend), None)
