"""The whole FiLM model with kernels=triton (and compile) equals kernels=reference: logits, every parameter
gradient and the BN buffers, for both stems, in train and eval mode; the state-dict is shared by all modes."""

import pytest
import torch

from fastfilm.config import ModelConfig
from fastfilm.model import FiLMModel

V, A = 20, 9


def cfg_for(stem: str, **kw) -> ModelConfig:
    base = dict(
        stem=stem,
        image_size=28,  # pixel stem: 28 → 14 → 7 (7×7 is not a multiple of any block size)
        stem_num_layers=2,
        feature_channels=5,
        feature_size=7,
        module_dim=6,
        wordvec_dim=5,
        rnn_hidden_dim=7,
        classifier_proj_dim=10,
        classifier_fc_dims=[11],
        num_blocks=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def make_pair(cfg, mode, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = FiLMModel(cfg, V, A, kernels="reference").to(dtype)
    other = FiLMModel(cfg, V, A, kernels=mode).to(dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


def inputs(cfg, n=3, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    if cfg.stem == "pixels":
        x = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    else:
        x = torch.randn(n, cfg.feature_channels, cfg.feature_size, cfg.feature_size, generator=g, dtype=dtype)
    q = torch.randint(4, V, (n, 6), generator=g)
    q[:, 0], q[:, -1] = 1, 2
    return x, q


def run(model, x, q, train=True):
    model.train(train)
    model.zero_grad()
    logits = model(x, q)
    # A loss whose gradient differs per logit, so every path of the backward is exercised.
    (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stem", ["pixels", "features"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_model_equals_reference_float64(stem, train):
    # float64: the kernels accumulate in float64 too, so any difference beyond rounding is a bug (tol 1e-10).
    cfg = cfg_for(stem)
    ref, tri = make_pair(cfg, "triton", torch.float64)
    if not train:  # non-trivial running statistics first
        for m in (ref, tri):
            m.train()
            with torch.no_grad():
                m(*inputs(cfg, dtype=torch.float64, seed=5))
    x, q = inputs(cfg, dtype=torch.float64)
    lr, gr, sr = run(ref, x, q, train)
    lt, gt, st = run(tri, x, q, train)
    torch.testing.assert_close(lt, lr, rtol=1e-10, atol=1e-10)
    assert gr.keys() == gt.keys() and len(gr) == len(list(ref.parameters()))
    for k in gr:
        torch.testing.assert_close(gt[k], gr[k], rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"grad {k}: {m}")
    assert sr.keys() == st.keys()
    for k in sr:  # running_mean / running_var / num_batches_tracked included
        torch.testing.assert_close(st[k], sr[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"state {k}: {m}")


@pytest.mark.parametrize("stem", ["pixels", "features"])
def test_triton_model_equals_reference_float32(stem):
    # float32: reductions run in another order. Exactness is the float64 test's job (1e-9 there); this one bounds
    # float32 drift at 1e-3 of each tensor's scale, because ReLU and max-pool are discontinuous: a 1e-7
    # difference can flip one mask element or one pooling argmax and move that element's whole gradient
    # (seen: classifier.1.bias at 4.8e-4). A real bug (a wrong term, a wrong mask) is off by O(1).
    cfg = cfg_for(stem)
    ref, tri = make_pair(cfg, "triton")
    x, q = inputs(cfg)
    lr, gr, sr = run(ref, x, q)
    lt, gt, st = run(tri, x, q)

    # Scale floor: the gradient of a conv bias right before a train-mode BN is exactly zero in exact arithmetic
    # (BN cancels it); both paths then hold float32 rounding noise (~1e-7), so such tensors are measured against
    # the model's largest gradient instead of their own.
    floor = 1e-3 * max(g.abs().max() for g in gr.values())

    def close(a, b, what):
        scale = torch.maximum(b.abs().max(), floor)
        assert (a - b).abs().max() / scale < 1e-3, f"{what}: {(a - b).abs().max() / scale}"

    close(lt, lr, "logits")
    for k in gr:
        close(gt[k], gr[k], f"grad {k}")
    for k in sr:
        if sr[k].is_floating_point():
            close(st[k], sr[k], f"state {k}")
        else:
            assert torch.equal(st[k], sr[k]), k


def test_triton_model_bf16_autocast_is_as_close_as_reference_bf16():
    # Under bf16 autocast, both paths round; ours must be no further from the float32 truth than PyTorch's own
    # bf16 reference is (2× + 1e-2 of the logits' scale: bf16 keeps 8 bits, the model stacks ~10 roundings).
    cfg = cfg_for("pixels")
    ref, tri = make_pair(cfg, "triton")
    x, q = inputs(cfg)
    truth, _, _ = run(ref, x, q)
    ref2, tri2 = make_pair(cfg, "triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lr, _, _ = run(ref2, x, q)
        lt, gt, _ = run(tri2, x, q)
    scale = truth.abs().max()
    err_ref = ((lr.float() - truth).abs().max() / scale).item()
    err_tri = ((lt.float() - truth).abs().max() / scale).item()
    assert err_tri <= 2 * err_ref + 1e-2, (err_tri, err_ref)
    assert all(torch.isfinite(g).all() for g in gt.values())
    assert tri2.net.blocks[0].bn1.running_mean.dtype == torch.float32


@pytest.mark.parametrize("src,dst", [("triton", "reference"), ("reference", "triton"), ("compile", "triton")])
def test_state_dict_is_shared_across_modes(src, dst):
    cfg = cfg_for("features")
    torch.manual_seed(0)
    a = FiLMModel(cfg, V, A, kernels=src)
    b = FiLMModel(cfg, V, A, kernels=dst)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict(), strict=True)
    x, q = inputs(cfg)
    spec = FiLMModel(cfg, V, A, kernels="reference")
    spec.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x, q), spec.eval()(x, q), rtol=1e-4, atol=1e-5)


def test_compile_model_equals_reference():
    cfg = cfg_for("pixels")
    ref, comp = make_pair(cfg, "compile")
    x, q = inputs(cfg)
    lr, gr, _ = run(ref, x, q)
    lc, gc, _ = run(comp, x, q)
    torch.testing.assert_close(lc, lr, rtol=1e-4, atol=1e-5)
    for k in gr:
        torch.testing.assert_close(gc[k], gr[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"grad {k}: {m}")


def test_unfused_ablations_fall_back_to_reference_with_a_warning():
    cfg = cfg_for("pixels", condition_method="relu-film")
    with pytest.warns(UserWarning, match="no fused kernel"):
        ref, tri = make_pair(cfg, "triton", torch.float64)
    x, q = inputs(cfg, dtype=torch.float64)
    lr, gr, _ = run(ref, x, q)
    lt, gt, _ = run(tri, x, q)
    torch.testing.assert_close(lt, lr, rtol=1e-10, atol=1e-10)
