"""What the machine decides: threads, precision (`train.precision: auto`), kernels (`kernels.mode: auto`), the
DeepSpeed CPU op's build folder, and the size of the `make train` demo. Each choice comes with the line that says
what was chosen and why; the trainer prints them first (rank 0) and all ranks run rank 0's choice.

Precision on a CPU: bf16 autocast only where this CPU has bf16 instructions that torch may use (`avx512_bf16` or
`amx_bf16` in its flags, and neither `ATEN_CPU_CAPABILITY` nor `ONEDNN_MAX_CPU_ISA` capping torch below them) and a
probe of the model's own forward + backward (< 1 s, small batch) runs faster in bf16 than in float32; else
float32. Without those instructions torch falls back to a scalar bf16 GEMM (an AVX2 EPYC: 24× slower matmul, 47×
slower conv than fp32): only a tiny matmul probe runs, to put the factor in the line. On CUDA: bf16 where the
device supports it, else fp16 with the loss scaler. An explicit `bf16`, `fp16` or `torch_autocast` in the
config's DeepSpeed section always wins.

Kernels on a CPU: the whole model under torch.compile (`reference` kernels, `train.compile`) inside graph mode's
static-shape step (`train.cuda_graphs`, uncaptured on a CPU) — MODEL_COMPILE — when a C++ compiler is there for
inductor, the run's time budget repays the compilations (8 minutes or more with AVX-512; 60 or more without,
where the compiled steps were only ~1.05× faster: MODEL_COMPILE_MIN_MINUTES_AVX2) and the run can take that step
(one rank unless asked, ZeRO stage 0, Adam, a unidirectional encoder); where it cannot, `compile` (the ResBlock's
ops) with bf16 autocast (in float32 it was slower than eager: FP32_REASON), else `reference`. On CUDA: measured
per op site when the model is built (`per-op`, fastfilm/kernel_pick.py: each fused op runs whichever of
`kernels.candidates` is fastest at the run's shapes; one mode for the whole model lost on an H200, batch 64,
bf16: reference 22.8 ms/step, triton 25.9, compile 28.3; bench/RESULTS_GPU.md). The Triton interpreter is never
chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Measured, 2 idle cores, AMD EPYC with avx512_bf16 (README, "Performance"): kernels=compile's first step took
# 10 s, its steps 1.36× faster than fp32 reference (bf16); see COMPILE_* below for how the rule uses them.
COMPILE_FIRST_STEP_S = 10.0
COMPILE_MIN_MINUTES = (
    2.0  # a budget (train.max_minutes) under this runs reference: the compile would not repay
)


@dataclass
class Choice:
    """One decision and why: `line()` is what the run prints."""

    what: str  # "precision", "kernels", "threads", "demo"
    value: Any
    reason: str

    def line(self) -> str:
        return f"{self.what}: {self.value} ({self.reason})"


# ----------------------------------------------------------------------------------------------- the machine
def cpu_info() -> dict[str, Any]:
    """The CPU's model name and flags (Linux /proc/cpuinfo; empty elsewhere)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return {"model": model or "unknown CPU", "flags": frozenset(flags)}


def cpu_capability() -> str:
    """torch's ATen CPU capability ("AVX2", "AVX512", ...; ATEN_CPU_CAPABILITY caps it)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build
        return "DEFAULT"


def usable_bf16(
    flags: frozenset[str] | set[str], capability: str, onednn_isa: str | None = None
) -> tuple[bool, str]:
    """Whether torch can use bf16 instructions here, and the words for the reason."""
    have = [f for f in BF16_FLAGS if f in flags]
    if not have:
        return False, "this CPU has no bf16 instructions (no avx512_bf16, no amx_bf16)"
    if not capability.upper().startswith(("AVX512", "AMX")):
        return (
            False,
            f"torch's CPU capability is {capability} (ATEN_CPU_CAPABILITY): {', '.join(have)} unused",
        )
    isa = (onednn_isa if onednn_isa is not None else os.environ.get("ONEDNN_MAX_CPU_ISA", "")).upper()
    if isa and isa != "ALL" and "BF16" not in isa and "AMX" not in isa:
        return False, f"ONEDNN_MAX_CPU_ISA={isa}: {', '.join(have)} unused"
    return True, f"this CPU has {', '.join(have)}"


def cores_available() -> tuple[int, str]:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
        why = f"{n} core(s) in this process's affinity"
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
        why = f"{n} core(s)"
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            q = max(1, int(int(quota) // int(period)))
            if q < n:
                n, why = q, f"a cgroup quota of {q} core(s)"
    except (OSError, ValueError):
        pass
    return n, why


def choose_threads(local_world: int, env: Mapping[str, str] | None = None) -> Choice:
    """torch's intra-op threads per rank: OMP_NUM_THREADS when set (the deepspeed launcher's core binding sets it),
    else the cores this process may use, shared out over the ranks of this machine (torch's default counts the
    machine's cores and ignores the affinity and the cgroup quota, and each rank took all of them)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return Choice("threads", int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS")
    cores, why = cores_available()
    n = max(1, cores // max(1, local_world))
    return Choice("threads", n, f"{why}, {local_world} rank(s) on this machine")


def cpu_kind(capability: bool = False) -> str:
    """A short hash of this CPU's model and vector flags (and, with `capability`, torch's ATen CPU capability): the
    key of the per-CPU build and code caches below."""
    info = cpu_info()
    key = (
        info["model"]
        + " "
        + " ".join(sorted(f for f in info["flags"] if f.startswith(("avx", "amx", "fma"))))
    )
    if capability:
        key += " " + cpu_capability()
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def extensions_dir(base: str | None = None) -> str:
    """A torch-extensions folder per CPU kind for DeepSpeed's JIT-built CPU op (built with -march=native: a build
    cached on an avx512 machine dies with an illegal instruction on an AVX2 one sharing the home folder)."""
    base = base or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(base, f"cpu-{cpu_kind()}")


def inductor_cache_dir(base: str | None = None) -> str:
    """torch.compile's cache folder per CPU kind and ATen CPU capability. Inductor's cache key leaves the
    capability out: kernels cached under AVX512 and replayed with ATEN_CPU_CAPABILITY=avx2 on the same machine
    gave NaN logits (torch 2.13, an avx512_bf16 EPYC, test_compile_model_equals_reference; a fresh cache passed),
    and a cache in a folder shared by two kinds of CPU would replay one's code on the other."""
    if base is None:
        import getpass
        import tempfile

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        base = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return os.path.join(base, f"cpu-{cpu_kind(capability=True)}")


def use_per_cpu_build_dirs() -> None:
    """Set TORCH_EXTENSIONS_DIR to `extensions_dir()` (CPU only) and TORCHINDUCTOR_CACHE_DIR to
    `inductor_cache_dir()`, each unless set already (by the user, or by an earlier compile in this process)."""
    if not torch.cuda.is_available() and "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()


# ------------------------------------------------------------------------------------------------- probes
class _one_thread:
    """Ratio probes run on one intra-op thread: a dtype's ratio per thread is what decides, and on a shared machine
    one descheduled OpenMP thread stalls a multi-threaded tiny op for milliseconds (timings swing 100×)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _best_time(fn: Callable[[], Any], reps: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_seconds(dtype: torch.dtype, n: int, device: str | torch.device = "cpu") -> float:
    """Best of two n×n @ n×n in `dtype` (after one warm-up), synchronised on a GPU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    cuda = torch.device(device).type == "cuda"

    def mm():
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()

    return _best_time(mm)


def sized_matmul(
    dtype: torch.dtype, device: str | torch.device = "cpu", max_seconds: float = 0.1, n_max: int = 2048
) -> tuple[int, float]:
    """The largest square matmul (a multiple of 64, ≤ n_max) that takes about `max_seconds` in `dtype` here: probes
    from 128² up, doubling while a product takes under an eighth of the target (a few ms at a scalar GEMM's ~1
    GFLOP/s; a GPU needs larger sizes before launches stop dominating); (n, GFLOP/s at the last probe)."""
    n = 128
    while True:
        t = max(matmul_seconds(dtype, n, device), 1e-7)
        if t >= max_seconds / 8 or 2 * n > n_max:
            break
        n *= 2
    gflops = 2 * n**3 / t / 1e9
    n = int((max_seconds * gflops * 1e9 / 2) ** (1 / 3)) // 64 * 64
    return max(64, min(n_max, n)), gflops


def _probe_batch(model_cfg: Any, vocab_size: int, batch: int, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    s = model_cfg.image_size
    if model_cfg.stem == "features":
        images = torch.randn(
            batch, model_cfg.feature_channels, model_cfg.feature_size, model_cfg.feature_size
        )
    else:
        images = torch.rand(batch, 3, s, s, generator=g)
    length = 12
    questions = torch.randint(1, max(2, vocab_size), (batch, length), generator=g)
    lengths = torch.full((batch,), length, dtype=torch.int64)
    return images.to(device), questions.to(device), lengths


def model_step_seconds(
    model: torch.nn.Module, inputs: tuple, dtype: torch.dtype | None, device: torch.device, optimizer=None
) -> float:
    """Best of two forward + backward (+ optimizer step) of `model` on `inputs` under autocast `dtype`."""
    from fastfilm.core.precision import autocast

    def step():
        with autocast(device, dtype):
            out = model(*inputs)
        out.float().logsumexp(1).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _best_time(step)


def build_probe_model(model_cfg: Any, vocab_size: int, num_answers: int, device: torch.device):
    from fastfilm.model import FiLMModel

    torch.manual_seed(0)
    return FiLMModel(model_cfg, vocab_size, num_answers, kernels="reference").to(device).train()


def precision_probe(
    model_cfg: Any,
    vocab_size: int,
    num_answers: int,
    device: torch.device,
    batch: int = 64,
    budget_s: float = 0.2,
) -> dict[str, float]:
    """Seconds per question of the model's forward + backward in float32 and in bf16 autocast, one thread, at the
    run's micro-batch (bf16 pays off with the larger GEMMs: the make-train model at 1 thread, bf16 ÷ fp32 time
    was ~1.0 at batch 8 and ~0.45 at 64, shared CPU) capped so that one float32 pass takes about `budget_s`
    (the whole probe ~1 s)."""
    model = build_probe_model(model_cfg, vocab_size, num_answers, device)
    with _one_thread() if device.type == "cpu" else contextlib.nullcontext():
        t = model_step_seconds(model, _probe_batch(model_cfg, vocab_size, 2, device), None, device)
        b = int(max(2, min(batch, 64, 2 * budget_s / max(t, 1e-6))))
        inputs = _probe_batch(model_cfg, vocab_size, b, device)
        out = {"fp32": model_step_seconds(model, inputs, None, device) / b}
        out["bf16"] = model_step_seconds(model, inputs, torch.bfloat16, device) / b
    out["batch"] = b
    return out


def matmul_ratio_probe(n: int = 256) -> dict[str, float]:
    """A tiny matmul in both dtypes, one thread (tens of ms even at a scalar GEMM's speed): seconds each."""
    with _one_thread():
        return {
            "fp32": matmul_seconds(torch.float32, n),
            "bf16": matmul_seconds(torch.bfloat16, n),
            "matmul": n,
        }


# ----------------------------------------------------------------------------------------------- precision
PRECISION_KEYS = ("bf16", "fp16", "torch_autocast")


def explicit_precision(cfg: Any) -> str | None:
    """The DeepSpeed key that sets the precision explicitly in the user's config (it wins over `auto`)."""
    for key in PRECISION_KEYS:
        if key in getattr(cfg, "deepspeed_user_keys", ()):
            return key
    return None


def _slower(probe: Mapping[str, float]) -> float:
    return probe["bf16"] / max(probe["fp32"], 1e-12)


def choose_precision(
    cfg: Any,
    device: torch.device,
    *,
    flags: frozenset[str] | set[str] | None = None,
    capability: str | None = None,
    onednn_isa: str | None = None,
    probe: Callable[[], Mapping[str, float]] | None = None,
    tiny_probe: Callable[[], Mapping[str, float]] | None = None,
    vocab_size: int = 100,
    num_answers: int = 30,
) -> Choice:
    """`train.precision: auto` for `cfg` on `device` (see the module docstring). `flags`, `capability`, `probe`
    (model fwd+bwd seconds per dtype) and `tiny_probe` (a tiny matmul per dtype) can be given (tests)."""
    from fastfilm.core.precision import autocast_dtype

    key = explicit_precision(cfg)
    if key is not None or cfg.train.precision != "auto":
        dt = autocast_dtype(cfg.deepspeed)
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
        why = (
            f"deepspeed.{key} in the config"
            if key
            else "train.precision=deepspeed: as the DeepSpeed section says"
        )
        return Choice("precision", name, why)
    if device.type == "cuda":
        # native bf16 only (compute capability ≥ 8): torch's default also says yes where bf16 is emulated (a T4)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Choice("precision", "bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        if cfg.deepspeed.get("zero_optimization", {}).get("stage", 0) != 0:
            return Choice(
                "precision", "fp32", "no bf16 on this GPU, and fp16's loss scaling needs ZeRO stage 0"
            )
        return Choice(
            "precision", "fp16", f"{torch.cuda.get_device_name(device)} has no bf16: fp16, loss scaling"
        )
    info = cpu_info() if flags is None else {"flags": flags}
    ok, why = usable_bf16(info["flags"], capability or cpu_capability(), onednn_isa)
    if not ok:
        p = (tiny_probe or matmul_ratio_probe)()
        r = _slower(p)
        words = f"bf16 matmul {r:.0f}× slower" if r >= 1.5 else f"bf16 matmul {r:.2f}× the fp32 time"
        return Choice("precision", "fp32", f"{why}: {words}")
    p = (probe or (lambda: precision_probe(cfg.model, vocab_size, num_answers, device, cfg.batch_size)))()
    r = 1 / _slower(p)
    if r >= 1.05:
        return Choice(
            "precision",
            "bf16",
            f"{why}; the model's forward + backward {r:.2f}× faster in bf16 at batch {p.get('batch', '?')}",
        )
    return Choice(
        "precision", "fp32", f"{why}, but the model's forward + backward is only {r:.2f}× as fast in bf16"
    )


def apply_precision(cfg: Any, choice: Choice) -> None:
    """Write the choice into the DeepSpeed section (what the engine, the run folder's config.json and a later
    evaluation read); an explicit section is left as it is."""
    if explicit_precision(cfg) is not None or cfg.train.precision != "auto":
        return
    ds = cfg.deepspeed
    ds.pop("torch_autocast", None)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": choice.value == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": choice.value == "fp16"}


PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def inference_precision(
    cfg: Any,
    device: torch.device,
    requested: str = "auto",
    *,
    flags: frozenset[str] | set[str] | None = None,
    capability: str | None = None,
    onednn_isa: str | None = None,
) -> Choice:
    """The autocast precision of `eval`, `predict` and `analyze` (value "fp32", "bf16" or "fp16"; the dtype is
    `PRECISION_DTYPES[value]`). `requested`: one of those three as asked; "model": the model's own (its config's
    DeepSpeed section, as its training evaluated); "auto" (the default): the model's, unless `device` only
    emulates it — bf16 on a CPU without bf16 instructions torch may use (20-50× slower than float32 on an AVX2
    EPYC), fp16 on a CPU without fp16 instructions (73× slower on an avx512_bf16 EPYC without avx512_fp16: a 3×3
    conv at 64×128×14² and a 1024² matmul took 2,682 ms against 36.8 in float32, 16.5 in bf16), bf16 on a GPU
    without native bf16 — then float32, which scores the same model, only without the rounding. `flags`, `capability`, `onednn_isa` can be given (tests)."""
    from fastfilm.core.config import INFERENCE_PRECISIONS
    from fastfilm.core.precision import autocast_dtype

    if requested not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(INFERENCE_PRECISIONS)}")
    if requested in PRECISION_DTYPES:
        return Choice("precision", requested, "as asked")
    own = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(cfg.deepspeed)]
    if requested == "model" or own == "fp32":
        return Choice("precision", own, "the model's")
    if device.type == "cuda":
        if own == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            return Choice("precision", "fp32", f"the model's bf16, but {name} only emulates bf16")
        return Choice("precision", own, "the model's")
    if device.type != "cpu":
        return Choice("precision", own, "the model's")
    flags = cpu_info()["flags"] if flags is None else flags
    if own == "bf16":
        ok, why = usable_bf16(flags, capability or cpu_capability(), onednn_isa)
    else:
        ok = any(f in flags for f in FP16_FLAGS)
        why = "this CPU has no fp16 instructions (no avx512_fp16, no amx_fp16)"
    if ok:
        return Choice("precision", own, "the model's")
    return Choice("precision", "fp32", f"the model's {own}, but {why}")


def prepare_inference(
    model: torch.nn.Module, cfg: Any, requested: str = "auto"
) -> tuple[torch.device, Choice]:
    """For `eval` and `analyze`: `model` on this process's device (`compute_device`) in the layout training uses
    there (`place`), and the precision to run it in (`inference_precision`), said in one line when it is not the
    model's own."""
    from fastfilm.core.devices import compute_device
    from fastfilm.model import place

    device = compute_device()
    place(model, device)
    choice = inference_precision(cfg, device, requested)
    announce_precision(choice, cfg)
    return device, choice


def announce_precision(choice: Choice, cfg: Any, file: Any = None) -> None:
    """One stderr line when `choice` (from `inference_precision`) is not the model's own precision unasked."""
    from fastfilm.core.precision import autocast_dtype

    if choice.reason != "as asked" and PRECISION_DTYPES[choice.value] != autocast_dtype(cfg.deepspeed):
        print(f"fastfilm: {choice.line()}; --precision model keeps it", file=file or sys.stderr)


# ------------------------------------------------------------------------------------------------- kernels
def have_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def choose_kernels(
    cfg: Any,
    device: torch.device,
    *,
    compiler: str | None | bool = True,
    precision: str = "bf16",
    world: int = 1,
    capability: str | None = None,
) -> Choice:
    """`kernels.mode: auto` (see the module docstring); other modes stay. `compiler=True`: look for one.
    `precision`: the run's (`choose_precision`'s value): on a CPU, compiling the ResBlock ops alone pays only
    with bf16 autocast. `world`: the run's ranks (with several, graph mode's step is opt-in). `capability`:
    torch's CPU capability (None: this machine's), which sets the budget the whole-model compile needs."""
    mode = cfg.kernels.mode
    if mode != "auto":
        return Choice("kernels", mode, "kernels.mode in the config")
    if device.type == "cuda":
        cands = [c for c in dict.fromkeys(cfg.kernels.candidates) if c != "reference"]
        if not cands:
            return Choice("kernels", "reference", "kernels.candidates has only the reference")
        return Choice(
            "kernels",
            PER_OP,
            f"each fused op timed at the run's shapes against {', '.join(['reference', *cands])} once the model is "
            "built; one mode for the whole model lost on an H200 (bf16: reference 22.8 ms/step, triton 25.9)",
        )
    cc = have_compiler() if compiler is True else compiler
    if not cc:
        return Choice("kernels", "reference", "no C++ compiler for torch.compile's CPU backend")
    budget = cfg.train.max_minutes
    if budget and budget < COMPILE_MIN_MINUTES:
        return Choice(
            "kernels",
            "reference",
            f"train.max_minutes={budget:g}: torch.compile's first step (~{COMPILE_FIRST_STEP_S:.0f} s on 2 cores) "
            "would not pay back",
        )
    why = model_compile_unsupported(cfg, world)
    wide = wide_vectors(cpu_capability() if capability is None else capability)
    min_minutes = MODEL_COMPILE_MIN_MINUTES if wide else MODEL_COMPILE_MIN_MINUTES_AVX2
    if why is None and budget and budget < min_minutes:
        why = (
            f"train.max_minutes={budget:g} (its compilations, ~{MODEL_COMPILE_S:.0f} s on 2 cores, repay over "
            f"{MODEL_COMPILE_MIN_MINUTES:g} minutes or more)"
            if wide
            else f"train.max_minutes={budget:g} ({AVX2_MODEL_COMPILE})"
        )
    if why is None:
        if wide:
            return Choice("kernels", MODEL_COMPILE, MODEL_COMPILE_REASON)
        limit = f"train.max_minutes={budget:g}" if budget else "train.max_minutes=0, no time limit"
        return Choice("kernels", MODEL_COMPILE, f"{MODEL_COMPILE_REASON_AVX2} ({limit})")
    if precision != "bf16":
        return Choice("kernels", "reference", f"{FP32_REASON}; the whole-model compile: not with {why}")
    return Choice("kernels", "compile", f"{COMPILE_REASON}; the whole-model compile: not with {why}")


def model_compile_unsupported(cfg: Any, world: int = 1) -> str | None:
    """Why a CPU run cannot take the whole-model compile (graph mode's static-shape step, which train.compile runs
    inside; the checks of `graphed.unsupported` that the config alone can answer), or None."""
    t = cfg.train
    if t.compile is False:
        return "train.compile=false"
    if t.cuda_graphs is False:
        return "train.cuda_graphs=false (the compile runs inside graph mode's static-shape step)"
    if world != 1 and t.cuda_graphs is not True:
        return f"{world} ranks (graph mode's step is opt-in there: train.cuda_graphs=true)"
    stage = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
    if stage:
        return f"ZeRO stage {stage} (graph mode needs stage 0)"
    kind = str(cfg.deepspeed.get("optimizer", {}).get("type", "Adam"))
    if kind.lower() not in ("adam", "adamw"):
        return f"optimizer {kind} (graph mode needs torch's fused Adam)"
    if cfg.model.bidirectional:
        return "a bidirectional encoder"
    return None


# Measured with bench/cpu_modes.py (make-train model, batch 64, 2 idle cores of an AMD EPYC under
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, 2026-12-04): fp32 reference 55.3 ms/step, compile 59.4.
FP32_REASON = (
    "in float32 torch.compile of the ResBlock ops was slower than eager (make-train model: 1,077 against 1,158 "
    "questions/s on an AVX2 CPU); it pays with bf16 autocast"
)
PER_OP = "per-op"  # kernels.mode auto on CUDA: fastfilm.kernel_pick times each op site
# kernels.mode auto on a CPU: the reference kernels, the whole model under torch.compile (train.compile) in graph
# mode's static-shape step (train.cuda_graphs, uncaptured on a CPU); `resolve` writes the three into the config.
MODEL_COMPILE = "reference + train.compile"
MODEL_COMPILE_S = 75.0  # its compilations in make train (one per question-length bucket), 2 cores: measured
# ... which steps ~1.2-1.3× faster repay after ~6-8 minutes (break-even c·r/(r − 1)); shorter budgets: the rule above
MODEL_COMPILE_MIN_MINUTES = 8.0
# ... with AVX-512 (torch's capability AVX512*/AMX). On a real AVX2-only EPYC (2026-12-05, make train, fp32) the
# compiled model's epochs were only ~1.05× faster than eager and its compilations took ~3.3 minutes: 2,900 steps in
# the 10 minutes against eager's 4,080 (bench/RESULTS_CPU_MODES.md; the 1.17× gain measured under AVX2 *emulation*
# on an avx512 core did not hold). There it repays after about an hour; without AVX2 or AVX-512 it is unmeasured.
MODEL_COMPILE_MIN_MINUTES_AVX2 = 60.0
AVX2_MODEL_COMPILE = (
    "on a CPU without AVX-512 its steps were only ~1.05× faster than eager after ~3.3 minutes of compilations (an "
    "AVX2-only EPYC: 2,900 steps in make train's 10 minutes against eager's 4,080), which a run of "
    f"{MODEL_COMPILE_MIN_MINUTES_AVX2:g} minutes or more repays"
)
MODEL_COMPILE_REASON_AVX2 = (
    f"the whole model under torch.compile in graph mode's static-shape step: {AVX2_MODEL_COMPILE}"
)


def wide_vectors(capability: str) -> bool:
    """Whether torch's CPU kernels (and inductor's code) get 512-bit vectors: capability AVX512* or AMX*."""
    return capability.upper().startswith(("AVX512", "AMX"))


MODEL_COMPILE_REASON = (
    "the whole model under torch.compile in graph mode's static-shape step: in make train's 10 minutes, its "
    "compilations included, 1.31× the steps of bf16 + compiled ResBlock ops on an avx512_bf16 EPYC (means of 2 "
    "runs each; bench/RESULTS_CPU_MODES.md)"
)


def build_mode(cfg: Any) -> str:
    """The kernels mode a `per-op` model is built with: the first non-reference candidate (every fused site
    exists; kernel_pick then sets each site's own implementation)."""
    return next((c for c in cfg.kernels.candidates if c != "reference"), "reference")


COMPILE_REASON = (
    "torch.compile of the ResBlock ops: its steps faster than eager on the CPUs measured, its first step "
    f"~{COMPILE_FIRST_STEP_S:.0f} s on 2 cores"
)


# ------------------------------------------------------------------------------------------------ the run
def decide(cfg: Any, device: torch.device, vocab: Mapping[str, Any] | None = None) -> list[Choice]:
    """Precision and kernels for `cfg` on this machine (this process only; see `resolve`)."""
    kw = {}
    if vocab is not None:
        kw = {
            "vocab_size": len(vocab["question_token_to_idx"]),
            "num_answers": len(vocab["answer_token_to_idx"]),
        }
    precision = choose_precision(cfg, device, **kw)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return [precision, choose_kernels(cfg, device, precision=precision.value, world=world)]


def apply_kernels(cfg: Any, kernels: Choice) -> None:
    """Write a kernels choice into `cfg`: kernels.mode (a per-op run is built with `build_mode`'s), and
    train.compile (true for MODEL_COMPILE, with train.cuda_graphs 'auto' made true; 'auto' becomes false else)."""
    if kernels.value == MODEL_COMPILE:
        cfg.kernels.mode, cfg.train.compile = "reference", True
        if cfg.train.cuda_graphs == "auto":
            cfg.train.cuda_graphs = True
    else:
        cfg.kernels.mode = build_mode(cfg) if kernels.value == PER_OP else kernels.value
    if cfg.train.compile == "auto":
        cfg.train.compile = False


def resolve(cfg: Any, device: torch.device, vocab: Mapping[str, Any] | None, rank: int = 0) -> list[Choice]:
    """Threads, precision and kernels for a training run: rank 0 decides, every rank applies the same choices
    (written into `cfg`), rank 0 prints one line each."""
    import torch.distributed as dist

    threads = None
    if device.type == "cpu":
        threads = choose_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))))
        torch.set_num_threads(threads.value)
    choices = decide(cfg, device, vocab) if rank == 0 else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [choices]
        dist.broadcast_object_list(box, src=0)
        choices = box[0]
    precision, kernels = choices
    apply_precision(cfg, precision)
    apply_kernels(cfg, kernels)
    out = ([threads] if threads is not None else []) + list(choices)
    if rank == 0:
        for c in out:
            print(f"fastfilm: {c.line()}", flush=True)
    return out


# ------------------------------------------------------------------------------------------- make-train demo
DEMO_TARGET_QUESTIONS = (
    320_000  # the make-train curve needs ~8 epochs of its 40k questions to pass 64% (64 px)
)
DEMO_EFFICIENCY = 0.75  # of the probed model-step speed left after loading, evaluation, logging and set-up


def demo_step_seconds(model_cfg: Any, vocab_size: int, num_answers: int, dtype, batch: int = 32) -> float:
    """Seconds per question of the trainer's work for `model_cfg` (forward, backward, fused Adam) on this CPU."""
    device = torch.device("cpu")
    model = build_probe_model(model_cfg, vocab_size, num_answers, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    inputs = _probe_batch(model_cfg, vocab_size, batch, device)
    return model_step_seconds(model, inputs, dtype, device, optimizer=opt) / batch


def plan_demo(
    cfg: Any,
    sizes: list[int],
    minutes: float,
    seconds_per_question: Callable[[int], float],
    target: int = DEMO_TARGET_QUESTIONS,
) -> Choice:
    """The largest image size (of `sizes`) at which `minutes` of training reach `target` questions at the probed
    speed (`seconds_per_question(size)`), else the fastest; the choice says the projected questions."""
    sizes = sorted(set(sizes), reverse=True)
    seen = []
    for s in sizes:
        q = int(minutes * 60 * DEMO_EFFICIENCY / max(seconds_per_question(s), 1e-9))
        seen.append(f"{s} px ≈ {q / 1000:.0f}k")
        if q >= target:
            return Choice(
                "demo image size",
                s,
                f"projected questions in {minutes:g} min: {', '.join(seen)} ≥ {target / 1000:.0f}k needed to learn",
            )
    return Choice(
        "demo image size",
        sizes[-1],
        f"projected questions in {minutes:g} min: {', '.join(seen)}, under the {target / 1000:.0f}k wanted: "
        "the smallest",
    )


def _demo_main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fastfilm.core.config import load_config

    cfg = load_config(args.config)
    torch.set_num_threads(choose_threads(1).value)
    vocab_size, num_answers = 100, 30
    vocab_file = os.path.join(cfg.data.cache, "vocab.json")
    if os.path.isfile(vocab_file):
        with open(vocab_file, encoding="utf-8") as f:
            v = json.load(f)
        vocab_size, num_answers = len(v["question_token_to_idx"]), len(v["answer_token_to_idx"])
    precision = choose_precision(cfg, torch.device("cpu"), vocab_size=vocab_size, num_answers=num_answers)
    dtype = torch.bfloat16 if precision.value == "bf16" else None
    minutes = args.minutes if args.minutes is not None else (cfg.train.max_minutes or 10)
    if torch.cuda.is_available():
        choice = Choice("demo image size", cfg.model.image_size, "a GPU: the config's own")
    else:
        choice = plan_demo(
            cfg,
            [int(s) for s in args.sizes.split(",")],
            minutes,
            lambda s: demo_step_seconds(replace(cfg.model, image_size=s), vocab_size, num_answers, dtype),
        )
    info = cpu_info()
    flags = " ".join(
        sorted(f for f in info["flags"] if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))
    )
    print(
        f"fastfilm: CPU {info['model']} ({flags or 'no avx2/avx512 flags'}), torch capability {cpu_capability()}",
        file=sys.stderr,
    )
    print(f"fastfilm: {choice.line()} [probed in {precision.value}]", file=sys.stderr, flush=True)
    print(choice.value)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fastfilm.auto demo --config C`: print the image size `make train` uses (the why on stderr)."""
    p = argparse.ArgumentParser(prog="python -m fastfilm.auto", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="size the make-train demo by a short speed probe")
    d.add_argument("--config", required=True)
    d.add_argument("--sizes", default="64,48,32", help="image sizes to choose from (comma list)")
    d.add_argument(
        "--minutes", type=float, default=None, help="the budget (default: train.max_minutes, or 10)"
    )
    args = p.parse_args(argv)
    return _demo_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
