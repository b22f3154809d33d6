"""Graph mode's step (fastfilm/graphed.py) on the CPU: static shapes, the padded encoder, no host sync, fullgraph.

CUDA graph capture itself needs a GPU (bench/gpu_step.py exercises it there); on the CPU the step runs the same
code uncaptured, which is what the trainer does with `train.cuda_graphs: true` and no CUDA device.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastfilm.config import ModelConfig, config_from_dict
from fastfilm.graphed import GraphedTrainStep, bucket_for, length_buckets, pad_questions
from fastfilm.model import FiLMModel
from tests.test_cuda_graph import FakeGraph, FakeStream, fake_streams
from tests.test_train import tiny_config

VOCAB, ANSWERS = 12, 5


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        image_size=16,
        stem_num_layers=2,
        num_blocks=2,
        module_dim=8,
        wordvec_dim=6,
        rnn_hidden_dim=10,
        classifier_proj_dim=8,
        classifier_fc_dims=[8],
    )
    return ModelConfig(**{**base, **kw})


def batch(n=6, t=9, seed=0, image_size=16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    q = torch.randint(4, VOCAB, (n, t), generator=g)
    q[:, 0] = 1
    pos = torch.arange(t).view(1, t)
    q = torch.where(pos == (lengths - 1).view(n, 1), torch.full_like(q, 2), q)
    q = torch.where(pos >= lengths.view(n, 1), torch.zeros_like(q), q)
    return {
        "image": torch.rand(n, 3, image_size, image_size, generator=g),
        "question": q,
        "length": lengths,
        "answer": torch.randint(0, ANSWERS, (n,), generator=g),
    }


def test_length_buckets():
    assert length_buckets(46) == [8, 16, 24, 32, 40, 46]
    assert length_buckets(8) == [8] and length_buckets(5) == [5] and length_buckets(17) == [8, 16, 17]
    b = length_buckets(46)
    assert [bucket_for(t, b) for t in (1, 8, 9, 41, 46, 50)] == [8, 8, 16, 46, 46, 50]
    q = torch.ones(2, 3, dtype=torch.long)
    assert pad_questions(q, 5).tolist() == [[1, 1, 1, 0, 0]] * 2


@pytest.mark.parametrize("encoder", ["gru", "lstm", "gru-2-layers"])
def test_static_encoder_equals_the_packed_one(encoder):
    """The padded RNN + gather at the last real token (lengths on the device) gives the packed path's logits and
    gradients: the RNN is causal, the padding after a question never reaches its feature."""
    kw = {"encoder_type": "lstm"} if encoder == "lstm" else {}
    if encoder == "gru-2-layers":
        kw["rnn_num_layers"] = 2
    torch.manual_seed(0)
    model = FiLMModel(small_cfg(**kw), VOCAB, ANSWERS).double().train()
    b = batch()
    images = b["image"].double()
    twin = copy.deepcopy(model)
    packed = model(images, b["question"], b["length"])
    static = twin(images, pad_questions(b["question"], 16), b["length"], static=True)  # bucket 16 > 9
    torch.testing.assert_close(static, packed, rtol=1e-12, atol=1e-12)
    packed.square().sum().backward()
    static.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_the_cpu_gru_and_the_static_encoder_agree_in_float32():
    torch.manual_seed(0)
    model = FiLMModel(small_cfg(), VOCAB, ANSWERS).train()  # the CPU's packed GRU (fastfilm/gru.py)
    b = batch()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(
        twin(b["image"], pad_questions(b["question"], 16), b["length"], static=True),
        model(b["image"], b["question"], b["length"]),
        rtol=1e-5,
        atol=1e-6,
    )


def build_engine(dataset, tmp_path, **ds):
    from fastfilm import train as trainer

    raw = tiny_config(dataset, tmp_path / "run")
    raw["deepspeed"].update(ds)
    cfg = config_from_dict(raw)
    trainer.setup_distributed(cfg)
    vocab = {
        "question_token_to_idx": {f"q{i}": i for i in range(VOCAB)},
        "answer_token_to_idx": {"a": 0, "b": 1},
    }
    vocab["answer_token_to_idx"] = {f"a{i}": i for i in range(ANSWERS)}
    torch.manual_seed(0)
    engine, optimizer, scaler = trainer.build_engine(cfg, vocab, torch.device("cpu"))
    engine.module.train()
    return cfg, engine, optimizer, scaler


def pre_bn_biases(model) -> set[str]:
    """State-dict keys of the biases of layers whose output goes straight into a BatchNorm (train mode cancels them)."""
    out = {n + ".bias" for n, m in model.named_modules() if n.endswith("conv1")}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Sequential):
            kids = list(m.named_children())
            for (ka, a), (_, b) in zip(kids, kids[1:]):
                if (
                    isinstance(b, torch.nn.modules.batchnorm._BatchNorm)
                    and getattr(a, "bias", None) is not None
                ):
                    out.add(f"{name}.{ka}.bias")
    return out


def assert_trained_weights_close(a, b, steps: int, lr: float) -> None:
    """Two models trained from the same weights on the same data by two computations equal up to float32 rounding.

    An element whose gradient is zero but for rounding gets Adam steps of ±lr from that noise: a bias just before a
    BatchNorm (train mode cancels it; skipped, with the running means it enters), and here and there any other
    element. So: every element within 4 × steps × lr (Adam's largest moves), and 99% of each tensor's elements (all of a
    tensor whose values are not ~0) within float32 rounding (rtol 1e-4)."""
    noise = pre_bn_biases(a)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k in noise or k.endswith("running_mean"):
            continue
        x, y = sa[k].float(), sb[k].float()
        if k.endswith("running_var"):
            # The batch variances of tiny micro-batches ((a − b)² / 2 over 2 samples) amplify the rounding
            # differences of their inputs: 4 of 16 running variances of the classifier's BatchNorm1d were
            # 1e-4-relative apart under ATEN_CPU_CAPABILITY=avx2 (other kernels, other rounding).
            torch.testing.assert_close(y, x, rtol=1e-2, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
            continue
        diff = (x - y).abs()
        assert diff.max() <= 4 * steps * lr, (k, float(diff.max()))  # |m̂/√v̂| <= ~3.2 with Adam's betas
        close = diff <= 1e-5 + 1e-4 * x.abs()
        if x.abs().max() >= 10 * steps * lr:  # ~0 tensors are all noise
            assert close.float().mean() >= 0.99, (k, float(close.float().mean()))


def test_static_step_follows_deepspeeds_engine_step(dataset, tmp_path):
    """Graph mode's step (uncaptured) against `train_step` (engine.backward / engine.step) from the same weights:
    gradient accumulation 2, clipping, L2 weight decay, the pre-clip grad norm; the only difference is the question
    encoder (padded to a bucket vs packed), so the weights agree within float32 rounding, not bit for bit."""
    from fastfilm import train as trainer

    engines = [build_engine(dataset, tmp_path, gradient_accumulation_steps=2, gradient_clipping=0.05)]
    engines.append(
        build_engine(dataset, tmp_path / "b", gradient_accumulation_steps=2, gradient_clipping=0.05)
    )
    (_, ea, _, _), (_, eb, ob, _) = engines
    eb.module.load_state_dict(ea.module.state_dict())
    step = GraphedTrainStep(eb.module, ob, device=torch.device("cpu"), grad_accum=2, clip=0.05, max_len=12)
    for i in range(6):
        b = batch(n=8, t=7 + i % 3, seed=i, image_size=32)
        boundary = i % 2 == 1
        ref = trainer.train_step(ea, b, torch.device("cpu"), want_grad_norm=True)
        loss, logits, answers, norm = step(b, boundary)
        assert ref.boundary == boundary
        torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
        if boundary:
            assert norm is not None and abs(float(norm) - ref.grad_norm) <= 1e-4 * ref.grad_norm
    # A bias just before a BatchNorm has a zero gradient up to rounding, which Adam scales to ±lr: those biases
    # (and the running means they enter) differ by rounding noise; everything else, and the logits, agree.
    assert_trained_weights_close(ea.module, eb.module, steps=3, lr=1e-3)
    b = batch(n=8, t=9, seed=99, image_size=32)
    torch.testing.assert_close(
        eb.module(b["image"], b["question"], b["length"]),
        ea.module(b["image"], b["question"], b["length"]),
        rtol=1e-4,
        atol=1e-5,
    )
    assert all(p.grad is not None and not p.grad.any() for p in eb.module.parameters())  # zeroed in place


# ----------------------------------------------------------------------- 6(b): no host sync inside the step
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim", "tolist"}  # fmt: skip


class HostSyncCounter(TorchDispatchMode):
    """Counts the ATen calls that make a GPU wait for the host to read a value: scalar reads (`.item()`, `int()`,
    `bool()`, `float()`), data-dependent shapes (nonzero, masked_select, unique), `equal`, and copies to the CPU of
    tensors that are not on the CPU (none exist here: on a CPU only the first two kinds can be counted)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        to_cpu = name in ("_to_copy", "copy_") and any(
            torch.is_tensor(a) and a.device.type not in ("cpu", "meta") for a in args
        )
        if name in SYNC_OPS or to_cpu:
            self.seen.append(func.__name__)
        return func(*args, **kwargs)


def test_the_step_has_no_host_synchronisation(dataset, tmp_path, monkeypatch):
    """N micro-steps (accumulation 2, clipping, bucketed lengths) under a dispatch mode that counts host syncs: none.
    The engine's step, on the same batches, reads the lengths on the host (packing): the counter does see those."""
    from fastfilm import train as trainer

    _, engine, optimizer, _ = build_engine(
        dataset, tmp_path, gradient_accumulation_steps=2, gradient_clipping=1.0
    )
    step = GraphedTrainStep(
        engine.module, optimizer, device=torch.device("cpu"), grad_accum=2, clip=1.0, max_len=12
    )
    batches = [batch(n=8, t=6 + i, seed=i, image_size=32) for i in range(4)]
    tolist = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist.append(1) or [])  # a hidden host read
    with HostSyncCounter() as counter:
        for i, b in enumerate(batches):
            step(b, boundary=i % 2 == 1)
    assert counter.seen == [] and tolist == []
    monkeypatch.undo()
    with HostSyncCounter() as counter:
        trainer.train_step(engine, batches[0], torch.device("cpu"))
    assert "_local_scalar_dense.default" in counter.seen


# ----------------------------------------------------------------- 6(a): the step compiles as one graph
def test_forward_and_backward_compile_fullgraph_at_the_static_shapes():
    """torch.compile(fullgraph=True) of the step's forward + loss at graph mode's static shapes (bucket 16, lengths
    as a tensor): no graph break, the question encoder included; AOTAutograd also traces the backward (its
    compiler is called once), and the gradients equal eager's."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd

    compiled = {"fw": 0, "bw": 0, "ops": set()}

    def fw(gm, _):
        compiled["fw"] += 1
        compiled["ops"] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return gm.forward

    def bw(gm, _):
        compiled["bw"] += 1
        return gm.forward

    torch.manual_seed(0)
    model = FiLMModel(small_cfg(), VOCAB, ANSWERS).train()
    twin = copy.deepcopy(model)
    b = batch()
    q = pad_questions(b["question"], 16)

    def loss_of(m, images, questions, lengths, answers):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            logits = m(images, questions, lengths, static=True)
        return F.cross_entropy(logits.float(), answers)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        step = torch.compile(
            loss_of, fullgraph=True, dynamic=False, backend=aot_autograd(fw_compiler=fw, bw_compiler=bw)
        )
        loss = step(model, b["image"], q, b["length"], b["answer"])
        loss.backward()
    assert compiled["fw"] == 1 and compiled["bw"] == 1
    ops = compiled[
        "ops"
    ]  # the encoder is in the one graph: embedding, the GRU's gates (decomposed), the gather
    assert {
        "aten.embedding.default",
        "aten.gather.default",
        "aten.sigmoid.default",
        "aten.tanh.default",
    } <= ops
    ref = loss_of(twin, b["image"], q, b["length"], b["answer"])
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for p, r in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------- the trainer with train.cuda_graphs on a CPU
def graph_mode(raw: dict) -> dict:
    raw["train"]["cuda_graphs"] = True
    return raw


@pytest.fixture
def static_steps(monkeypatch):
    """Counts graph mode's steps (the trainer must really take them) and switches graph mode on in tiny_config."""
    import fastfilm.graphed as graphed
    import tests.test_train as tt

    real_config, real_call = tt.tiny_config, graphed.GraphedTrainStep.__call__
    calls = []

    def call(self, batch, boundary=True):
        calls.append(boundary)
        return real_call(self, batch, boundary)

    monkeypatch.setattr(tt, "tiny_config", lambda *a, **kw: graph_mode(real_config(*a, **kw)))
    monkeypatch.setattr(graphed.GraphedTrainStep, "__call__", call)
    return calls


@pytest.mark.parametrize(
    "name",
    [
        "test_resume_is_bit_exact",
        "test_gradient_accumulation_counts_optimizer_steps_and_resumes_bit_exact",
        "test_fp16_autocast_with_loss_scaling_resumes_bit_exact",
        "test_bf16_autocast_trains_with_float32_bn_stats",
    ],
)
def test_trainer_tests_pass_at_graph_modes_static_shapes(name, dataset, tmp_path, static_steps):
    """The trainer's resume, accumulation, fp16 loss-scaler and BN-stats tests (tests/test_train.py), run with
    `train.cuda_graphs: true`: on a CPU the static-shape step runs uncaptured, bucketed lengths and all."""
    import tests.test_train as tt

    getattr(tt, name)(dataset, tmp_path)
    assert static_steps and any(static_steps)


def test_graph_mode_on_a_cpu_says_so_in_one_line(dataset, tmp_path, capsys):
    from fastfilm.train import train

    train(config_from_dict(graph_mode(tiny_config(dataset, tmp_path / "run", max_steps=2))))
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "cuda_graphs" in x]
    assert lines == [
        "fastfilm: train.cuda_graphs: no CUDA device; graph mode's static-shape step runs eagerly"
    ]
    train(config_from_dict(tiny_config(dataset, tmp_path / "auto", max_steps=1)))  # auto on a CPU: silent
    assert "cuda_graphs" not in capsys.readouterr().out


def test_config_keys_and_the_memory_format_default(dataset, tmp_path):
    from fastfilm.config import ConfigError
    from fastfilm.train import memory_format

    raw = tiny_config(dataset, tmp_path / "run")
    cfg = config_from_dict(raw)
    assert (cfg.train.cuda_graphs, cfg.train.compile, cfg.model.memory_format) == ("auto", "auto", "auto")
    assert memory_format(cfg, torch.device("cpu")) == "channels_first"
    assert memory_format(cfg, torch.device("cuda")) == "channels_last"
    assert memory_format(cfg, torch.device("cuda"), zero_stage=2) == "channels_first"
    for value in (True, False):
        raw["train"]["cuda_graphs"] = value
        assert config_from_dict(raw).train.cuda_graphs is value
    raw["train"]["cuda_graphs"] = "always"
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        config_from_dict(raw)
    raw["train"].update(cuda_graphs="auto", compile="yes")
    with pytest.raises(ConfigError, match="train.compile: expected true, false or 'auto'"):
        config_from_dict(raw)


def test_train_compile_runs_the_compiled_forward_in_graph_modes_step(dataset, tmp_path, monkeypatch, capsys):
    """train.compile: the trainer's static-shape step calls the model's forward compiled with fullgraph (the
    `eager` backend here: dynamo's tracing without inductor's minutes of C++ compilation on a CPU)."""
    import functools

    import torch._dynamo

    import fastfilm.graphed as graphed
    from fastfilm.train import train

    seen = []
    real = graphed.compiled_forward

    def compiled(model, fullgraph=True, backend="inductor"):
        seen.append(fullgraph)
        return real(model, fullgraph, backend="eager")

    monkeypatch.setattr(graphed, "compiled_forward", functools.partial(compiled))
    torch._dynamo.reset()
    raw = graph_mode(tiny_config(dataset, tmp_path / "run", max_steps=3))
    raw["train"]["compile"] = True
    summary = train(config_from_dict(raw))
    assert summary["step"] == 3 and seen == [True]
    raw = tiny_config(dataset, tmp_path / "off", max_steps=1)
    raw["train"].update(compile=True, cuda_graphs=False)
    train(config_from_dict(raw))
    assert "train.compile needs graph mode's step" in capsys.readouterr().out
    # kernels.mode auto on a CPU: the reference kernels, the whole model compiled in graph mode's static step
    monkeypatch.setattr("fastfilm.auto.have_compiler", lambda: "g++")
    raw = tiny_config(dataset, tmp_path / "auto", max_steps=2)
    raw["kernels"] = {"mode": "auto"}
    torch._dynamo.reset()
    assert train(config_from_dict(raw))["step"] == 2 and seen == [True, True]
    out = capsys.readouterr().out
    assert "fastfilm: kernels: reference + train.compile (" in out and "kernels=reference" in out
    assert "graph mode's static-shape step runs eagerly" in out
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert (saved["kernels"]["mode"], saved["train"]["compile"], saved["train"]["cuda_graphs"]) == (
        "reference", True, True
    )  # fmt: skip


def capturing_step(monkeypatch) -> tuple:
    """A graph-mode step on the CPU with capture switched on and the CUDA calls around a capture faked
    (tests/test_cuda_graph.py): (step, batch, key, its buffers, the graphs made, the stream state)."""
    torch.manual_seed(0)
    model = FiLMModel(small_cfg(), VOCAB, ANSWERS).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = GraphedTrainStep(model, opt, device=torch.device("cpu"), capture=False, max_len=9)
    b = batch()
    key = step.key(b, True)
    bufs = step._load(key, b)
    streams = fake_streams(monkeypatch)
    graphs = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(FakeGraph()) or graphs[-1])
    step.capture, step.stream = True, FakeStream("side")
    step.lr = [torch.tensor(float(g["lr"])) for g in opt.param_groups]  # as __init__ with capture on
    return step, b, key, bufs, graphs, streams


def test_a_failed_capture_says_so_and_the_step_runs_uncaptured(monkeypatch, capsys):
    """Without a GPU the capture is simulated (tests/test_cuda_graph.py: torch's own torch.cuda.graph context, a graph
    whose capture_end fails once an op inside broke the capture): the line names the op's error, the stream is the
    one before the capture, the step goes on uncaptured; the capture is tried once more (a first failure may be
    another thread's device sync), and a second failure turns it off for the run."""
    step, b, key, bufs, graphs, streams = capturing_step(monkeypatch)
    real_compute, default = step.compute, streams["current"]

    def uncapturable(bufs, boundary):
        graphs[-1].broken = True
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    step.compute = uncapturable
    error = (
        "(RuntimeError: operation not permitted when stream is capturing (then at the capture's end: RuntimeError: "
        "CUDA error: operation failed due to a previous error during capture))"
    )
    assert step._capture(key, bufs) is None
    assert step.capture and step.captures == 0 and graphs[0].began_on is step.stream
    assert streams["current"] is default
    assert capsys.readouterr().out.strip().splitlines() == [
        f"fastfilm: graph mode: capturing the step failed {error}; this step runs uncaptured, the capture is "
        "tried once more at this shape's next step"
    ]
    assert step._capture(key, bufs) is None  # the second failure: off for the run
    assert not step.capture and step.captures == 0 and streams["current"] is default
    assert capsys.readouterr().out.strip().splitlines() == [
        f"fastfilm: graph mode: capturing the step failed again {error}; it runs uncaptured from here on"
    ]
    step.compute = real_compute
    loss, *_ = step(b, True)  # and the step goes on, uncaptured
    assert torch.isfinite(loss)


def test_a_capture_that_fails_once_is_retried_and_replayed(monkeypatch, capsys):
    """A transient failure (the first capture broken by something outside the step): that step runs uncaptured,
    the shape's next step captures, and later steps replay the graph."""
    step, b, key, bufs, graphs, _ = capturing_step(monkeypatch)
    real_compute, calls = step.compute, []

    def compute(bufs, boundary):
        calls.append(len(graphs))
        if len(graphs) == 1 and len(calls) == 1:  # the first capture only
            graphs[-1].broken = True
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_compute(bufs, boundary)

    step.compute = compute
    assert step._capture(key, bufs) is None and step.capture
    assert "tried once more" in capsys.readouterr().out
    graph = step._capture(key, bufs)
    assert graph is graphs[1] and step.captures == 1 and step.graphs[key] is graph and key in step.outputs


def test_the_trainer_reads_the_device_only_at_its_sync_every_and_log_every_steps(
    dataset, tmp_path, monkeypatch
):
    """The whole training loop in graph mode (uncaptured on the CPU) under the host-sync counter: the device is read
    only at the steps where the trainer logs and the ranks agree (every 4 here), never in the steps between."""
    import fastfilm.graphed as graphed
    from fastfilm.train import train

    real = graphed.trainer_step
    marks = []  # (event, number of host syncs counted so far)

    def watched(run):
        step = real(run)

        def run_step(batch, want_grad_norm=False):
            marks.append(("start", len(counter.seen)))
            out = step(batch, want_grad_norm)
            marks.append(("end", len(counter.seen)))
            return out

        return run_step

    monkeypatch.setattr(graphed, "trainer_step", watched)
    raw = graph_mode(tiny_config(dataset, tmp_path / "run", max_steps=5, sync_every=4, log_every=4))
    cfg = config_from_dict(raw)
    with HostSyncCounter() as counter:
        train(cfg)
    counts = [n for _, n in marks]
    inside = [counts[i + 1] - counts[i] for i in range(0, len(counts), 2)]
    between = [counts[i + 1] - counts[i] for i in range(1, len(counts) - 1, 2)]  # after step 1, 2, 3, 4
    assert inside == [
        0,
        0,
        0,
        1,
        0,
    ]  # step 4 reads its grad norm for the log record (want_grad_norm), no other
    assert [n > 0 for n in between] == [False, False, False, True]  # step 4: the log record and the agreement
