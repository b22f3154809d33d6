"""`kernels.mode: auto` on a GPU picks each fused op site's implementation by measurement (fastfilm/kernel_pick.py).
The picking runs here on the CPU: the Triton kernels in the interpreter, times from a fake timer where the choice
is the point, and real timing where the timing loop is."""

import json

import pytest
import torch

from fastfilm import kernel_pick
from fastfilm.config import ModelConfig
from fastfilm.model import BatchNormReLU, CoordConv, FiLMedResBlock, FiLMModel
from tests.kernels.helpers import assert_float32_model_close

V, A = 20, 9


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        stem="pixels", image_size=20, stem_num_layers=2, module_dim=6, wordvec_dim=5, rnn_hidden_dim=7,
        classifier_proj_dim=10, classifier_fc_dims=[11], num_blocks=3,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def model(mode="triton", **kw) -> FiLMModel:
    torch.manual_seed(0)
    return FiLMModel(small_cfg(**kw), V, A, kernels=mode)


def fake_timer(table, calls=None):
    """A timer that runs the candidate once (it must work) and returns its time from `table` (by impl)."""

    def timer(fn, device, graphed):
        fn()
        if calls is not None:
            calls.append((fn.impl, graphed))
        return table[fn.impl]

    return timer


def test_sites_of_a_kernel_model():
    m = model()
    kinds = [type(mod) for _, mod in kernel_pick.op_sites(m)]
    assert (
        kinds.count(FiLMedResBlock) == 3 and kinds.count(CoordConv) == 4
    )  # 3 input projections + classifier
    assert kinds.count(BatchNormReLU) == 3  # two stem layers and the classifier's
    ref = model("reference")
    assert [n for n, _ in kernel_pick.op_sites(ref)] == [
        n for n, mod in ref.named_modules() if isinstance(mod, CoordConv)
    ]  # the reference network has no fused ResBlock and no BatchNormReLU


def test_same_shapes_share_one_measurement_and_the_fastest_wins():
    m = model()
    batch = kernel_pick.synthetic_batch(m, 4, torch.device("cpu"))
    calls = []
    picks = kernel_pick.measure(
        m, batch, ["triton"], None, timer=fake_timer({"reference": 2.0, "triton": 1.0}, calls)
    )
    by_class = {}
    for p in picks:
        by_class.setdefault(p.key.split()[0], []).append(p)
    assert len(by_class["FiLMedResBlock"]) == 1 and len(by_class["FiLMedResBlock"][0].sites) == 3
    assert len(by_class["BatchNormReLU"]) == 3  # 10×10, 5×5 in the stem; the classifier's 10 channels
    assert all(p.choice == "triton" for p in picks)
    assert len(calls) == 2 * len(picks) and not any(g for _, g in calls)
    kernel_pick.apply(m, picks)
    assert all(mod.kernels == "triton" for _, mod in kernel_pick.op_sites(m))


def test_a_tie_keeps_the_reference_and_a_failing_candidate_is_left_out():
    assert kernel_pick.choose({"reference": 1.0, "triton": 0.99}) == "reference"
    assert kernel_pick.choose({"reference": 1.0, "triton": 0.97}) == "triton"
    assert kernel_pick.choose({"reference": 1.0, "triton": 1.5, "compile": 0.5}) == "compile"
    m = model()
    batch = kernel_pick.synthetic_batch(m, 3, torch.device("cpu"))

    def timer(fn, device, graphed):
        if fn.impl == "triton":
            raise RuntimeError("cannot be captured\nsecond line")
        return 1.0

    picks = kernel_pick.measure(m, batch, ["triton"], None, timer=timer)
    assert all(p.choice == "reference" and "cannot be captured" in p.errors["triton"] for p in picks)
    assert "triton failed (RuntimeError: cannot be captured)" in picks[0].line()

    def no_capture_of_the_reference(fn, device, graphed):
        if graphed and fn.impl == "reference":
            raise RuntimeError("operation not permitted when stream is capturing")
        return {"reference": 1.0, "triton": 0.5}[fn.impl]

    picks = kernel_pick.measure(m, batch, ["triton"], None, graphed=True, timer=no_capture_of_the_reference)
    # the whole group is then timed eagerly (like against like): triton's eager 0.5 beats the reference's 1.0
    assert all(p.choice == "triton" and "timed eagerly" in p.errors["graph"] for p in picks)
    assert "reference not capturable, timed eagerly" in picks[0].line()

    def broken_reference(fn, device, graphed):
        raise RuntimeError("the reference must run")

    with pytest.raises(RuntimeError, match="the reference must run"):
        kernel_pick.measure(m, batch, ["triton"], None, timer=broken_reference)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_mixed_model_equals_the_reference(amp):
    """After picking, sites run different implementations: the model still computes the reference's logits,
    gradients and BN statistics (the picked model shares the reference's weights)."""
    ref, mixed = model("reference"), model("triton")
    mixed.load_state_dict(ref.state_dict())
    batch = kernel_pick.synthetic_batch(mixed, 4, torch.device("cpu"))
    table = {}
    for i, (name, _) in enumerate(kernel_pick.op_sites(mixed)):  # alternate by site: both kinds present
        table[name] = "triton" if i % 2 else "reference"
    picks = kernel_pick.measure(
        mixed, batch, ["triton"], amp, timer=fake_timer({"reference": 1.0, "triton": 0.5})
    )
    for p in picks:
        p.choice = table[p.sites[0]]
    kernel_pick.apply(mixed, picks)
    assert {mod.kernels for _, mod in kernel_pick.op_sites(mixed)} == {"reference", "triton"}
    truth = model("reference")  # float32, no autocast: what bf16 paths are measured against
    truth.load_state_dict(ref.state_dict())
    outs = []
    for m, a in ((truth, None), (ref, amp), (mixed, amp)):
        m.train()
        with torch.autocast("cpu", dtype=a or torch.bfloat16, enabled=a is not None):
            logits = m(batch["image"], batch["question"], batch["length"])
        # a gradient that differs per logit (the sum's would be cancelled by the classifier's BatchNorm1d)
        weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
        (logits.float() * weights).sum().backward()
        outs.append((logits.float(), {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (l_true, _, s_true), (l_ref, g_ref, s_ref), (l_mix, g_mix, s_mix) = outs
    if amp is not None:
        # As tests/kernels/test_model_parity.py's autocast test: no further from the float32 truth than torch's own
        # autocast reference (2× + 1e-2 of the scale); BN buffers float32 and as close; gradients finite float32
        # (at this size bf16 moves float32 gradients by 5-19 %, so they are not compared by value).
        def err(a, b):
            return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

        assert err(l_mix, l_true) <= 2 * err(l_ref, l_true) + 1e-2
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g_mix.values())
        for k in s_true:
            if "running" in k:
                assert s_mix[k].dtype == torch.float32
                assert err(s_mix[k], s_true[k]) <= 2 * err(s_ref[k], s_true[k]) + 1e-2, k
        return
    assert_float32_model_close(outs[1], outs[2])  # as tests/kernels/test_model_parity.py


def test_measuring_leaves_the_models_statistics_alone():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batch = kernel_pick.synthetic_batch(m, 3, torch.device("cpu"))
    kernel_pick.measure(m, batch, ["triton"], None, timer=fake_timer({"reference": 1.0, "triton": 2.0}))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in m.parameters())


def test_time_call_counts_its_calls():
    calls = []
    t = iter(range(100))
    sec = kernel_pick.time_call(
        lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=5, groups=3, clock=lambda: float(next(t))
    )
    assert len(calls) == 2 + 5 * 3 and sec == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="CUDA"):
        kernel_pick.time_call(lambda: None, torch.device("cpu"), graphed=True)


def test_real_measurement_on_the_cpu(tmp_path):
    """The whole `pick` with real timing (interpreter Triton against eager PyTorch: the reference wins here), its
    lines and its JSON."""
    m = model(image_size=12)
    lines = []
    picks = kernel_pick.pick(
        m, 2, ["triton"], None, graphed=False, run_dir=str(tmp_path), say=lines.append,
        timing=dict(warmup=1, reps=2, groups=2),  # the interpreter is slow; a real clock all the same
    )  # fmt: skip
    assert lines[0].startswith("fastfilm: kernels: measured") and len(lines) == 1 + len(picks)
    assert all(p.seconds["reference"] > 0 and p.seconds["triton"] > 0 for p in picks)
    saved = json.loads((tmp_path / "kernel_picks.json").read_text())
    assert saved["graphed"] is False and [p["choice"] for p in saved["picks"]] == [p.choice for p in picks]
    for _, mod in kernel_pick.op_sites(m):
        assert mod.kernels in ("reference", "triton")


def test_training_with_kernels_auto_on_a_gpu_measures_applies_and_logs(
    dataset, tmp_path, monkeypatch, capsys
):
    """The trainer's wiring: with `kernels.mode: auto` decided as on a GPU (`per-op`), the model is built with every
    fused site, each site is timed (a fake clock here: the reference wins, so the run itself stays fast), the
    lines are printed, the times written to the run folder, and the run folder's config keeps `auto` (an
    evaluation elsewhere decides again)."""
    from fastfilm import auto
    from fastfilm.config import config_from_dict
    from fastfilm.train import train
    from tests.test_train import tiny_config

    monkeypatch.setattr(
        auto,
        "choose_kernels",
        lambda cfg, device, **kw: auto.Choice("kernels", auto.PER_OP, "as on a GPU (test)"),
    )
    seen = []

    def fake_time_call(fn, device, graphed=False, **kw):
        seen.append((fn.impl, graphed))
        return {"reference": 0.5, "triton": 1.0}[fn.impl]

    monkeypatch.setattr(kernel_pick, "time_call", fake_time_call)
    run = tmp_path / "run"
    raw = tiny_config(dataset, run, epochs=1)
    raw["kernels"] = {"mode": "auto"}
    train(config_from_dict(raw))
    out = capsys.readouterr().out
    assert "kernels: per-op (as on a GPU (test))" in out and "fastfilm: kernels: measured" in out
    assert (
        "fastfilm: kernels: reference for FiLMedResBlock" in out and "kernels=per op (measured, above)" in out
    )
    assert {impl for impl, _ in seen} == {"reference", "triton"} and not any(g for _, g in seen)  # CPU: eager
    saved = json.loads((run / "kernel_picks.json").read_text())
    assert saved["picks"] and all(p["choice"] == "reference" for p in saved["picks"])
    assert json.loads((run / "config.json").read_text())["kernels"]["mode"] == "auto"


@pytest.mark.parametrize("stem", ["pixels", "features"])
def test_recorded_inputs_require_grad_where_the_step_computes_it(stem):
    """The timed forward+backward computes the gradients the training step does: every site input that comes out of
    the model's parameters requires grad, the raw input (the features stem's first CoordConv) does not."""
    m = model(stem=stem, feature_channels=5, feature_size=6)
    batch = kernel_pick.synthetic_batch(m, 2, torch.device("cpu"))
    raw_seen = 0
    for name, args in kernel_pick.record_inputs(m, batch, None).items():
        for a in args:
            if torch.is_tensor(a) and a.is_floating_point():
                raw = a.shape == batch["image"].shape and torch.equal(a, batch["image"])
                raw_seen += raw
                assert a.requires_grad != raw, (name, a.shape)
    assert raw_seen == (stem == "features")
    fn = kernel_pick.make_fwd_bwd(dict(kernel_pick.op_sites(m))[name], args, "reference", None)
    fn()  # runs, with the recorded flags


def test_a_kernel_that_fails_at_the_runs_shapes_is_left_out_not_fatal(monkeypatch):
    """When the model's own forward fails while the inputs are recorded, they are recorded on the reference
    implementation: a Triton op that raises (on a GPU: a compile error at this run's shapes) loses its sites to the
    reference instead of stopping the run (`kernels.mode: auto` on a GPU)."""
    import kernels

    real = kernels.bn_film_relu

    def failing(*args, impl="triton", **kwargs):
        if impl == "triton":
            raise RuntimeError("triton: out of resources (simulated)")
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(kernels, "bn_film_relu", failing)
    m = model()
    batch = kernel_pick.synthetic_batch(m, 2, torch.device("cpu"))
    picks = kernel_pick.measure(
        m, batch, ["triton"], None, timer=fake_timer({"reference": 2.0, "triton": 1.0})
    )
    failed = [p for p in picks if "triton" in p.errors]
    assert failed and all(
        p.choice == "reference" and "out of resources" in p.errors["triton"] for p in failed
    )
    assert any(p.choice == "triton" for p in picks)  # the CoordConv sites, which do not call it
