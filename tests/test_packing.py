"""The question encoder reads only real tokens (packed by `lengths`): same logits and gradients as running the
RNN over the padding (unidirectional), a defined bidirectional feature, and a clear rule when `lengths` and the
padding disagree."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastfilm.config import ModelConfig
from fastfilm.model import FiLMModel, real_lengths

V, A = 93, 32


def small(**kw) -> ModelConfig:
    base = dict(
        image_size=32,
        stem_num_layers=2,
        module_dim=8,
        wordvec_dim=8,
        rnn_hidden_dim=16,
        classifier_proj_dim=12,
        classifier_fc_dims=[14],
        num_blocks=2,
    )
    base.update(kw)
    if base.get("stem") == "features":
        base.setdefault("feature_channels", 5)
        base.setdefault("feature_size", 6)
    return ModelConfig(**base)


def batch(lengths: list[int], t: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions <START> w… <END> <NULL>… padded to `t` (default: the longest), and their lengths."""
    g = torch.Generator().manual_seed(seed)
    t = t or max(lengths)
    q = torch.randint(4, V, (len(lengths), t), generator=g)
    q[:, 0] = 1
    for i, n in enumerate(lengths):
        q[i, n - 1] = 2
        q[i, n:] = 0
    return q, torch.tensor(lengths)


def images(cfg: ModelConfig, n: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if cfg.stem == "pixels":
        return torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    return torch.randn(n, cfg.feature_channels, cfg.feature_size, cfg.feature_size, generator=g, dtype=dtype)


def padded_encode(gen, questions, lengths=None):
    """The computation before packing (and the original's): the RNN over every position, padding included,
    then its output at the last non-NULL token."""
    n = questions.shape[0]
    idx = ((questions != 0).sum(1) - 1).clamp(min=0)
    out, _ = gen.encoder_rnn(gen.encoder_embed(questions))
    return out.gather(1, idx.view(n, 1, 1).expand(n, 1, out.size(2))).view(n, out.size(2))


def unpacked_twin(model: FiLMModel) -> FiLMModel:
    twin = copy.deepcopy(model)
    twin.generator.encode = types.MethodType(padded_encode, twin.generator)
    return twin


MIXED = [2, 13, 5, 13, 3, 9]  # the shortest possible question (<START> <END>), the longest, and between


@pytest.mark.parametrize("encoder", ["gru", "lstm"])
@pytest.mark.parametrize("stem", ["pixels", "features"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_unidirectional_logits_and_gradients_equal_the_padded_computation(encoder, stem, train, dtype):
    torch.manual_seed(0)
    cfg = small(encoder_type=encoder, stem=stem)
    model = FiLMModel(cfg, V, A).to(dtype).train(train)
    twin = unpacked_twin(model)
    q, lengths = batch(MIXED, t=15)  # two columns of padding past the longest question too
    x = images(cfg, len(MIXED), dtype)
    out = model(x, q, lengths)
    ref = twin(x, q, lengths)
    tol = {"rtol": 0, "atol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(out, ref, **tol)
    (out.square().sum() + out[:, 5].sum()).backward()
    (ref.square().sum() + ref[:, 5].sum()).backward()
    twin_params = dict(twin.named_parameters())
    scale = max(float(p.grad.norm()) for p in model.parameters())
    for name, p in model.named_parameters():
        expected = twin_params[name].grad
        if dtype == torch.float64:
            torch.testing.assert_close(p.grad, expected, **tol, msg=name)
        else:  # float32 rounding, amplified by a train-mode BN over 6 samples (seen: ≤ 1e-5 relative); a
            # gradient that is exactly zero in exact arithmetic (a conv bias before such a BN) is noise in both
            err = float((p.grad - expected).norm())
            assert err <= 5e-5 * float(expected.norm()) + 1e-6 * scale, (name, err, float(expected.norm()))
    for (name, b), b2 in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, b2, **tol, msg=name)


@pytest.mark.parametrize("length,t", [(7, 7), (4, 9)], ids=["unpadded", "padded"])
@pytest.mark.parametrize("encoder", ["gru", "lstm"])
def test_batch_of_one(encoder, length, t):
    torch.manual_seed(0)
    cfg = small(encoder_type=encoder)
    model = FiLMModel(cfg, V, A).double().eval()
    q, lengths = batch([length], t=t)
    x = images(cfg, 1, torch.float64)
    torch.testing.assert_close(model(x, q, lengths), unpacked_twin(model)(x, q, lengths), rtol=0, atol=1e-10)


def test_two_layer_gru_and_lengths_derived_from_the_padding():
    torch.manual_seed(0)
    model = FiLMModel(small(rnn_num_layers=2), V, A).double().eval()
    q, lengths = batch(MIXED)
    gen = model.generator
    torch.testing.assert_close(gen.encode(q, lengths), padded_encode(gen, q), rtol=0, atol=1e-10)
    torch.testing.assert_close(gen.encode(q), gen.encode(q, lengths), rtol=0, atol=0)


def test_no_flop_is_spent_on_padding():
    """The RNN's matmuls cover sum(lengths) tokens, not N × T (counted, not timed)."""
    torch.manual_seed(0)
    cfg = small()
    gen = FiLMModel(cfg, V, A).generator
    q, lengths = batch(MIXED, t=15)

    def rnn_flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_flop_counts()["Global"]  # encode: the RNN's matmuls only

    h, e = cfg.rnn_hidden_dim, cfg.wordvec_dim
    per_token = 2 * 3 * h * (e + h)
    packed = sum(rnn_flops(lambda: gen.encode(q, lengths)).values())
    padded = sum(rnn_flops(lambda: padded_encode(gen, q)).values())
    # fastfilm.gru skips step 0's product with h0 = 0: 2·3H·H per question fewer.
    assert packed == per_token * int(lengths.sum()) - 2 * 3 * h * h * len(lengths)
    assert padded == per_token * q.numel()


def test_lengths_win_over_the_padding():
    """Given lengths decide what is read: tokens after them are ignored whatever they are, and a NULL inside
    them is read as a token. Lengths outside [1, T], of the wrong shape or not integers are an error."""
    torch.manual_seed(0)
    gen = FiLMModel(small(), V, A).double().eval().generator
    q, lengths = batch([5, 8, 3])
    garbage = q.clone()
    garbage[0, 5:] = 7  # non-NULL tokens after the first question's <END>
    garbage[2, 3:] = 2
    torch.testing.assert_close(gen.encode(garbage, lengths), gen.encode(q, lengths), rtol=0, atol=0)
    # Longer than the non-NULL tokens: the NULLs up to the length are read (the RNN runs over them).
    longer = torch.tensor([7, 8, 3])
    expected, _ = gen.encoder_rnn(gen.encoder_embed(q[:1, :7]))
    torch.testing.assert_close(gen.encode(q, longer)[0], expected[0, -1], rtol=0, atol=1e-12)
    assert not torch.allclose(gen.encode(q, longer)[0], gen.encode(q, lengths)[0])
    for bad, match in [
        (torch.tensor([0, 8, 3]), r"lengths must lie in \[1, 8\]"),
        (torch.tensor([5, 9, 3]), r"lengths must lie in \[1, 8\]"),
        (torch.tensor([5, 8]), r"expected shape \[3\]"),
        (torch.tensor([5.0, 8.0, 3.0]), "must be integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            gen.encode(q, bad)
    assert real_lengths(q).tolist() == [5, 8, 3]
    assert real_lengths(torch.zeros(1, 4, dtype=torch.long)).tolist() == [1]  # all-NULL: the first token


@pytest.mark.parametrize("encoder", ["gru", "lstm"])
def test_bidirectional_reads_each_question_once_in_each_direction(encoder):
    """Forward half: the state at <END>. Backward half: the state after reading <END> … <START> (the whole
    question). Neither depends on the padding; the original's backward half (gathered at <END> after reading
    the padding) did."""
    torch.manual_seed(0)
    gen = FiLMModel(small(encoder_type=encoder, bidirectional=True), V, A).double().eval().generator
    rnn, h = gen.encoder_rnn, gen.encoder_rnn.hidden_size
    q, lengths = batch([4, 9, 6])
    feat = gen.encode(q, lengths)
    assert feat.shape == (3, 2 * h)
    wider = torch.cat([q, torch.zeros(3, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(gen.encode(wider, lengths), feat, rtol=0, atol=1e-12)

    one_way = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[encoder](gen.encoder_embed.embedding_dim, h)
    one_way = one_way.double()
    for i, n in enumerate(lengths.tolist()):
        emb = gen.encoder_embed(q[i, :n])
        for direction, suffix, seq in ((0, "", emb), (1, "_reverse", emb.flip(0))):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(one_way, f"{name}_l0").data.copy_(getattr(rnn, f"{name}_l0{suffix}"))
            out, _ = one_way(seq)
            torch.testing.assert_close(
                feat[i, direction * h : (direction + 1) * h], out[-1], rtol=0, atol=1e-12
            )

    old = padded_encode(gen, wider)  # the original's feature: equal forward half, different backward half
    torch.testing.assert_close(old[:, :h], feat[:, :h], rtol=0, atol=1e-12)
    assert not torch.allclose(old[:, h:], feat[:, h:])
    assert not torch.allclose(padded_encode(gen, q)[:, h:], old[:, h:])  # it depended on the padding


def test_bf16_autocast_runs_packed():
    torch.manual_seed(0)
    cfg = small()
    model = FiLMModel(cfg, V, A)
    q, lengths = batch(MIXED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(cfg, len(MIXED)), q, lengths)
    assert out.shape == (len(MIXED), A) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert model.generator.encoder_rnn.weight_hh_l0.grad.abs().sum() > 0


def test_empty_batch():
    gen = FiLMModel(small(), V, A).generator
    gammas, betas = gen(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert gammas.shape == betas.shape == (0, 2, 8)


# ------------------------------------------------------------------ fastfilm.gru: the CPU GRU the model uses
def _gen_pair(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    gen = FiLMModel(small(**kw), V, A).to(dtype).generator
    plain = copy.deepcopy(gen)
    plain.cpu_gru = False  # nn.GRU on the packed sequence
    return gen, plain


@pytest.mark.parametrize("lengths", [MIXED, [7, 7, 7], [4], [9]], ids=["mixed", "equal", "one-padded", "one"])
def test_cpu_gru_equals_nn_gru_with_gradients(lengths):
    gen, plain = _gen_pair()
    assert gen.cpu_gru and gen._plain_gru()
    q, lens = batch(lengths, t=max(lengths) + 1)
    out, ref = gen(q, lens), plain(q, lens)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    (out[0].square().sum() + out[1].sum()).backward()
    (ref[0].square().sum() + ref[1].sum()).backward()
    ref_params = dict(plain.named_parameters())
    for name, p in gen.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=0, atol=1e-10, msg=name)


def test_cpu_gru_under_bf16_autocast_is_close_to_nn_gru():
    """Matmuls in bf16, gates and states in float32: as close to nn.GRU's autocast result as bf16 allows."""
    gen, plain = _gen_pair(torch.float32, rnn_hidden_dim=64)
    q, lens = batch(MIXED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = gen.encode(q, lens), plain.encode(q, lens)
    exact = plain.encode(q, lens)
    assert out.dtype == torch.float32
    assert (out - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-3
    out.square().sum().backward()
    ref.float().square().sum().backward()
    for (name, p), p2 in zip(gen.encoder_rnn.named_parameters(), plain.encoder_rnn.parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), p2.grad.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_nn_gru_packed_path_still_matches_the_padded_computation():
    _, plain = _gen_pair()
    q, lens = batch(MIXED, t=15)
    torch.testing.assert_close(plain.encode(q, lens), padded_encode(plain, q), rtol=0, atol=1e-10)
