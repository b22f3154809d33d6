"""Shared pieces of the benchmark harness (`pytest bench/`, `bench/profile_step.py`).

Nothing here times anything by itself: it builds the inputs, the models and the step functions, and it
provides the one timing helper (`run`) every benchmark goes through, so that GPU timings always synchronise
(the timer calls `torch.cuda.synchronize()` before reading the clock) and always have warm-up rounds.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
INTERPRETER_SKIP = "Triton interpreter: not a timing"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The paper's vocabulary sizes (DESIGN.md §1): 93 question tokens, 28 CLEVR answers + 4 specials = 32 logits.
PAPER_VOCAB, PAPER_ANSWERS = 93, 32
# CLEVR's longest question is 43 words + <START>/<END>: the synthetic batches are padded to this length on the
# GPU; the model packs them, so its GRU reads each question's own length only.
PAPER_QUESTION_LEN = 46


# ------------------------------------------------------------------------------------------------- device
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def device_name() -> str:
    """The GPU's name, or the CPU's model name (the report says CPU numbers are for shape-checking only)."""
    if CUDA:
        return torch.cuda.get_device_name()
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict[str, Any]:
    """torch / triton / CUDA / cuDNN (and the optional packages) as the report prints them."""
    out: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # reported, not fatal
        out["triton"] = f"unavailable ({type(e).__name__})"
    out["cuda"] = torch.version.cuda if CUDA else None
    out["cudnn"] = torch.backends.cudnn.version() if CUDA else None
    # float32 GEMMs/convs may run as TF32 on a GPU: the trainer leaves these at torch's defaults, and so do we.
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    try:  # the installed version, without importing deepspeed (slow, and it probes accelerators)
        from importlib.metadata import version

        out["deepspeed"] = version("deepspeed")
    except Exception:
        out["deepspeed"] = None
    try:
        import nvidia.dali

        out["dali"] = nvidia.dali.__version__
    except Exception:
        out["dali"] = None
    out["torch_threads"] = torch.get_num_threads()
    out["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    return out


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cuda_synchronized_perf_counter() -> float:
    """The benchmark timer on a GPU: wait for every queued kernel, then read the clock."""
    torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Sizes and round counts for one run: GPU full / GPU quick / CPU / CPU quick."""

    cuda: bool
    quick: bool
    include_interpreter: bool

    # The fused ResBlock op (DESIGN.md §3): the paper's block is C=128 at 14×14.
    @property
    def op_ns(self) -> list[int]:
        if self.cuda:
            return [64] if self.quick else [64, 256, 512]
        return [4] if self.quick else [4, 8]

    @property
    def op_c(self) -> int:
        return 128 if self.cuda else (16 if self.quick else 32)

    @property
    def op_hw(self) -> int:
        return 14 if self.cuda else 7

    # Timing: seconds of timed rounds per benchmark, and the bounds on the number of rounds.
    @property
    def target_s(self) -> float:
        if self.cuda:
            return 0.3 if self.quick else 1.0
        return 0.05 if self.quick else 0.3

    @property
    def min_rounds(self) -> int:
        return 3 if (self.quick and not self.cuda) else 5

    @property
    def max_rounds(self) -> int:
        return 200 if self.cuda else 50

    @property
    def warmup(self) -> int:
        return 3 if self.cuda else (1 if self.quick else 2)

    # Loader: a tiny synthetic set (CLEVR layout) and its cache, built once per session.
    @property
    def loader_set(self) -> dict[str, int]:
        if self.cuda:
            return {"train_images": 128, "questions_per_image": 10, "image_size": 224, "batch": 64}
        if self.quick:
            return {"train_images": 8, "questions_per_image": 4, "image_size": 32, "batch": 8}
        return {"train_images": 24, "questions_per_image": 4, "image_size": 64, "batch": 16}


def skip_reason(impl: str, settings: Settings) -> str | None:
    """Why a case is collected but not timed here (None: time it)."""
    if impl == "triton" and not settings.cuda and not settings.include_interpreter:
        return INTERPRETER_SKIP + " (run with --bench-include-interpreter to time it anyway)"
    return None


def fresh_compile_state(impl: str) -> None:
    """Before a `compile` case: forget earlier compilations. The kernels compile with `dynamic=False`, so each
    shape/dtype/grad-mode is one more recompilation of the same function, and past dynamo's recompile limit
    (8) it silently runs eagerly: a "compile" row would then time the reference. A reset avoids that (the
    compilation happens again, in the untimed warm-up)."""
    if impl == "compile":
        torch._dynamo.reset()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a `compile` case must add at least one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def autocast(dtype: torch.dtype | None):
    """The trainer's mixed precision: torch.autocast to bf16 around the forward (None/fp32: nothing)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device().type, dtype=dtype)


# ----------------------------------------------------------------------------------------------- the timer
def run(
    benchmark,
    fn: Callable[[], Any],
    settings: Settings,
    *,
    warmup: int | None = None,
    min_round_s: float = 0.0,
    max_iterations: int = 1,
) -> None:
    """Time `fn` with pytest-benchmark: warm-up calls first (compilation, autotuning, cuDNN's algorithm search
    happen there, untimed), then as many rounds as fit in `settings.target_s`.

    On a GPU the timer synchronises before each clock read, so a round's time is the time until its kernels
    have finished. With `max_iterations > 1`, a round runs `fn` back to back until it lasts at least
    `min_round_s` (pytest-benchmark divides by the count; the per-call time is steady-state enqueue + run).
    """
    warmup = settings.warmup if warmup is None else warmup
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    iterations = 1
    if max_iterations > 1 and one < min_round_s:
        iterations = min(max_iterations, math.ceil(min_round_s / one))
    rounds = int(settings.target_s / (one * iterations))
    rounds = max(settings.min_rounds, min(settings.max_rounds, rounds))
    if CUDA and hasattr(benchmark, "_timer"):
        benchmark._timer = cuda_synchronized_perf_counter
    elif CUDA:  # a pytest-benchmark without the attribute: synchronise inside the timed call instead
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        warmup_rounds=warmup,
        iterations_per_round=iterations,
        timer="cuda_synchronized_perf_counter" if CUDA else "perf_counter",
    )
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)


def median_seconds(benchmark) -> float | None:
    """The median time per call of a finished benchmark (None when benchmarking is disabled). Throughputs
    in extra_info use the median: one descheduled round on a busy machine moves the mean a lot."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    inner = getattr(stats, "stats", stats)
    return float(inner.median) if getattr(inner, "data", None) else None


# ------------------------------------------------------------------------------------- fused ResBlock op
def bn_film_relu_bytes(n: int, c: int, h: int, w: int, itemsize: int, backward: bool) -> int:
    """The minimum traffic of the fused op (what must cross memory at least once), in bytes.

    E = N·C·H·W elements of `itemsize` bytes; γ, β are [N, C] in the activation dtype; running stats float32.
      forward:        read z + read r + write out                 = 3·E·s
                      + read γ, β                                 + 2·N·C·s
                      + read/write running mean & var (train)     + 4·C·4
      forward+backward adds: read dout + read z + write dz + write dr = 4·E·s
                      + write dγ, dβ                              + 2·N·C·s
    (A real kernel moves more: the batch statistics need one extra pass over z unless it stays on chip, and
    the backward's reductions a second pass over dout and z. GB/s from this formula is therefore a lower
    bound on the bandwidth actually used: "effective" bandwidth.)
    """
    e = n * c * h * w
    total = 3 * e * itemsize + 2 * n * c * itemsize + 4 * c * 4
    if backward:
        total += 4 * e * itemsize + 2 * n * c * itemsize
    return total


def bn_film_relu_inputs(
    n: int, c: int, hw: int, dtype: torch.dtype, backward: bool, seed: int = 0, layout: str = "nchw"
):
    """z, γ, β, r, running mean, running var (float32) and dout on the device; z/γ/β/r require grad when
    `backward`. γ is 1 + Δγ as the generator produces it. `layout="nhwc"`: the 4-D tensors in channels_last."""
    g = torch.Generator().manual_seed(seed)
    dev = device()
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def rnd(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g) * scale + shift).to(dev, dtype)
        t = t.contiguous(memory_format=fmt) if t.dim() == 4 else t
        return t.requires_grad_(backward)

    z = rnd(n, c, hw, hw, scale=2.0, shift=0.5)
    gamma = rnd(n, c, shift=1.0, scale=0.2)
    beta = rnd(n, c, scale=0.2)
    r = rnd(n, c, hw, hw)
    rm = torch.zeros(c, device=dev, dtype=torch.float32)
    rv = torch.ones(c, device=dev, dtype=torch.float32)
    dout = torch.randn(n, c, hw, hw, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
    return z, gamma, beta, r, rm, rv, dout


# ----------------------------------------------------------------------------------------- model and step
def paper_config(overrides: tuple[str, ...] = ()):
    """configs/clevr.json: the paper's raw-pixel model, batch 64 (`--set` style overrides allowed)."""
    from fastfilm.config import load_config

    return load_config(os.path.join(ROOT, "configs", "clevr.json"), overrides)


# A small raw-pixel model for CPU shape-checking: same structure (stem, 4 FiLMed ResBlocks, classifier, GRU).
SMALL_MODEL_OVERRIDES = (
    "model.image_size=32",
    "model.stem_num_layers=2",
    "model.num_blocks=4",
    "model.module_dim=16",
    "model.wordvec_dim=16",
    "model.rnn_hidden_dim=64",
    "model.classifier_proj_dim=32",
    "model.classifier_fc_dims=[32]",
    "deepspeed.train_micro_batch_size_per_gpu=8",
)


def bench_config(settings: Settings | None = None, overrides: tuple[str, ...] = ()):
    """The model config a train-step benchmark uses: the paper's on a GPU, a small one on a CPU."""
    cuda = CUDA if settings is None else settings.cuda
    return paper_config(overrides if cuda else SMALL_MODEL_OVERRIDES + tuple(overrides))


def question_len(cfg) -> int:
    return PAPER_QUESTION_LEN if cfg.model.rnn_hidden_dim >= 1024 else 12


def synthetic_batch(cfg, batch: int | None = None, seq_len: int | None = None, seed: int = 0) -> dict:
    """A batch shaped like the loader's: images float [N,3,S,S] in [0,1], questions <START> w… <END> <NULL>…,
    lengths, answers among the real answers (ids ≥ 4)."""
    n = batch or cfg.batch_size
    t = seq_len or question_len(cfg)
    g = torch.Generator().manual_seed(seed)
    dev = device()
    s = cfg.model.image_size
    images = torch.rand(n, 3, s, s, generator=g)
    lengths = torch.randint(min(8, t), t + 1, (n,), generator=g)
    q = torch.randint(4, PAPER_VOCAB, (n, t), generator=g)
    pos = torch.arange(t).view(1, t)
    q[:, 0] = 1  # <START>
    q = torch.where(pos == (lengths - 1).view(n, 1), torch.full_like(q, 2), q)  # <END>
    q = torch.where(pos >= lengths.view(n, 1), torch.zeros_like(q), q)  # <NULL> padding
    answers = torch.randint(4, PAPER_ANSWERS, (n,), generator=g)
    return {
        "image": images.to(dev),
        "question": q.to(dev),
        "length": lengths,
        "answer": answers.to(dev),
    }


def build_model(cfg, kernels: str):
    """The FiLM model as the trainer builds it (memory format, device), in train mode."""
    from fastfilm.model import FiLMModel

    torch.manual_seed(0)
    model = FiLMModel(cfg.model, PAPER_VOCAB, PAPER_ANSWERS, kernels=kernels)
    if cfg.model.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.to(device()).train()


def build_engine(cfg, kernels: str, dtype: torch.dtype | None):
    """The trainer's DeepSpeed engine (`fastfilm.train.build_engine`: model, Adam with coupled L2 — fused on CUDA —
    and `deepspeed.initialize`) for this one process, with `dtype` as the forward's autocast (None: float32)."""
    from fastfilm import train

    cfg.kernels.mode = kernels
    cfg.deepspeed["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg.deepspeed["fp16"] = {"enabled": False}
    cfg.train.dist_timeout_s = 60
    train.setup_distributed(cfg)  # a world of one, as `fastfilm train`
    torch.manual_seed(0)
    vocab = {
        "question_token_to_idx": {f"q{i}": i for i in range(PAPER_VOCAB)},
        "answer_token_to_idx": {f"a{i}": i for i in range(PAPER_ANSWERS)},
    }
    engine, _, _ = train.build_engine(cfg, vocab, device())
    engine.module.train()
    return engine


def make_train_step(engine, batch: dict) -> Callable[[], torch.Tensor]:
    """One optimizer step exactly as the trainer takes it: `fastfilm.train.train_step` (autocast forward by the
    engine, float32 cross-entropy, `engine.backward`, `engine.step`); returns the loss."""
    from fastfilm import train

    def step() -> torch.Tensor:
        return train.train_step(engine, batch, device()).loss

    return step


def gru_flops(cfg, n: int, t: int) -> int:
    """Forward FLOPs of the generator's GEMMs: GRU (3 gates, input and hidden projections) + the decoder.

    Per token and sample a GRU layer does 2·3·H·(E + H) multiply-adds×2; the decoder 2·H·(blocks·2·C) per
    sample. Backward costs about twice the forward (so fwd+bwd ≈ 3×)."""
    m = cfg.model
    h, e = m.rnn_hidden_dim, m.wordvec_dim
    gru = 2 * 3 * h * (e + h) * t * n
    for _ in range(m.rnn_num_layers - 1):
        gru += 2 * 3 * h * (h + h) * t * n
    dec = 2 * h * m.num_blocks * 2 * m.module_dim * n
    return gru + dec
