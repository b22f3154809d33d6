"""bench/loop_gru.py is nn.GRU: outputs and every gradient in float64, within bf16's rounding under CPU autocast, and
FiLMGen's static encoder gives the same feature with it."""

from __future__ import annotations

import loop_gru
import pytest
import torch


def _gru(e=4, h=6, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.GRU(e, h, batch_first=True).to(dtype)


def _run(fn, rnn, x, grad):
    for p in rnn.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out = fn(rnn, x)
    (out * grad).sum().backward()
    return out.detach(), [x.grad] + [p.grad.clone() for p in rnn.parameters()]


@pytest.mark.parametrize("n,t", [(3, 5), (1, 1), (4, 2)])
def test_equals_nn_gru_in_float64(n, t):
    rnn = _gru()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, t, 4, generator=g, dtype=torch.float64)
    grad = torch.randn(n, t, 6, generator=g, dtype=torch.float64)
    ref_out, ref_grads = _run(lambda r, x: r(x)[0], rnn, x, grad)
    out, grads = _run(loop_gru.loop_gru, rnn, x, grad)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_is_within_bf16_rounding_of_float32():
    rnn = _gru(8, 16, torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, 8, generator=g)
    grad = torch.randn(5, 7, 16, generator=g)
    ref_out, ref_grads = _run(loop_gru.loop_gru, rnn, x, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(loop_gru.loop_gru, rnn, x, grad)
    assert out.dtype == torch.float32  # the states stay float32
    assert (out - ref_out).norm() / ref_out.norm() < 2e-2
    for a, b in zip(grads, ref_grads):
        assert (a - b).norm() / b.norm() < 3e-2
    assert (out - ref_out).abs().max() > 0  # the products did run in bf16


def test_static_encoder_gives_the_same_feature():
    import benchlib

    from fastfilm.model import FiLMModel

    cfg = benchlib.paper_config(benchlib.SMALL_MODEL_OVERRIDES)
    model = FiLMModel(cfg.model, 20, 8).double()
    gen = model.generator
    g = torch.Generator().manual_seed(3)
    q = torch.randint(3, 20, (4, 9), generator=g)
    lengths = torch.tensor([9, 4, 1, 6])
    ref = gen.static_encode(q, lengths)
    loop_gru.use_loop_gru(gen)
    torch.testing.assert_close(gen.static_encode(q, lengths), ref, rtol=1e-10, atol=1e-12)


def test_refuses_what_it_does_not_compute():
    for rnn in (
        torch.nn.LSTM(4, 6, batch_first=True),
        torch.nn.GRU(4, 6, batch_first=True, bidirectional=True),
        torch.nn.GRU(4, 6, num_layers=2, batch_first=True),
        torch.nn.GRU(4, 6, batch_first=False),
    ):
        with pytest.raises(ValueError, match="loop_gru"):
            loop_gru.loop_gru(rnn, torch.zeros(1, 1, 4))


def test_the_cells_compile_whole_and_compute_the_same():
    """On a GPU the cells run under torch.compile (inductor): here dynamo traces both as one graph each
    (fullgraph) with aot_eager, and the step equals the eager cells."""
    rnn = _gru(8, 16, torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 8, generator=g)
    grad = torch.randn(3, 6, 16, generator=g)
    ref_out, ref_grads = _run(loop_gru.loop_gru, rnn, x, grad)
    out, grads = _run(lambda r, x: loop_gru.loop_gru(r, x, compile_backend="aot_eager"), rnn, x, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
