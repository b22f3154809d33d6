"""`kernels.mode: auto` on a GPU: each fused op site runs the implementation measured fastest there, at the run's
own shapes, dtype and layout, once, when training starts.

A kernel that is slower than eager at the sizes a run uses is not its hot path (ISSUE 23: on an H200 the fused
ResBlock op took 1.15 ms forward+backward at N=64 against 0.89 ms eager, outside a graph). So instead of one mode
for the whole model, every module whose code the kernel mode switches (`CoordConv`, a fused `FiLMedResBlock`,
`BatchNormReLU`) is timed per candidate implementation (`kernels.candidates`: reference, triton, compile):

1. one training-mode forward of a copy of the model on a synthetic batch of the run's micro-batch, image size and
   precision records each site's inputs (the model's own running statistics are not touched);
2. sites with the same module class, input shapes, dtypes and layout share one measurement;
3. per candidate, a copy of the module runs forward + backward (a fixed upstream gradient) `warmup` times
   (autotuning, compilation), then `reps` times in `groups` groups; the best group's mean is its time. In graph
   mode (the step is one CUDA graph) the `reps` calls are captured into a CUDA graph and replayed, so launch
   overhead counts as it will in the step; a candidate that cannot be captured is left out there;
4. every site of the group gets the fastest candidate (`module.kernels = ...`); ties within 2% keep the reference.

Rank 0 measures and every rank applies rank 0's choice (`pick` broadcasts it). The run prints one line per
group and writes all the times to `kernel_picks.json` in the run folder. The CPU keeps `fastfilm.auto`'s rule
(compile or reference for the whole model: its compilation per site would cost minutes there), but the picking
itself runs on the CPU in the tests (tests/test_kernel_pick.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fastfilm.core.cuda_graph import capture
from fastfilm.model import BatchNormReLU, CoordConv, FiLMedResBlock, FiLMModel

TIE = 0.02  # a candidate must beat the reference by more than this share to replace it


@dataclass
class Pick:
    """One group of op sites with the same inputs: its key, its sites, each candidate's seconds, the winner."""

    key: str
    sites: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    choice: str = "reference"

    def line(self) -> str:
        times = ", ".join(
            f"{k} {v * 1e3:.3f} ms" for k, v in sorted(self.seconds.items(), key=lambda kv: kv[1])
        )
        failed = "".join(f", {k} failed ({v})" for k, v in self.errors.items() if k != "graph")
        failed += f"; {self.errors['graph']}" if "graph" in self.errors else ""
        return (
            f"kernels: {self.choice} for {self.key} × {len(self.sites)} ({times}{failed}; forward + backward)"
        )


def op_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose code `kernels` switches, by path: CoordConv, fused FiLMedResBlock, BatchNormReLU."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (CoordConv, BatchNormReLU)) or (isinstance(m, FiLMedResBlock) and m.fused):
            out.append((name, m))
    return out


def _layout(t: torch.Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "channels_last"
    return "contiguous"


def site_key(module: nn.Module, args: Sequence[Any]) -> str:
    """What decides a site's best implementation: its class and configuration, and its inputs' shapes, dtypes and
    layout."""
    parts = [type(module).__name__]
    if isinstance(module, CoordConv):
        parts.append(f"k{module.weight.shape[-1]} {module.weight.shape[0]}←{module.weight.shape[1] - 2}")
        parts.append("relu" if module.relu else "no relu")
    for a in args:
        if torch.is_tensor(a):
            parts.append(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')} {_layout(a)}")
    return " ".join(parts)


def record_inputs(
    model: FiLMModel, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None, reference: bool = False
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each op site's positional inputs (detached copies that require grad where the input did) in one
    training-mode forward of a copy of `model` (`reference`: every site on its reference implementation)."""
    probe = copy.deepcopy(model).train()
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    hooks = []
    for name, m in op_sites(probe):
        if reference:
            _set_impl(m, "reference")

        def hook(mod, args, name=name):
            seen.setdefault(
                name,
                tuple(
                    a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                    for a in args
                ),
            )

        hooks.append(m.register_forward_pre_hook(hook))
    device = next(probe.parameters()).device
    try:
        # with autograd on, as in training: an input that needs no gradient there (the raw images or features at
        # the first site) is recorded as such, and the timed backward computes only the gradients the step does
        with torch.enable_grad(), _autocast(device, amp_dtype):
            probe(batch["image"], batch["question"], batch["length"])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The run's autocast, without the weight-cast cache (a CUDA graph must not capture cached casts; graph mode's
    step runs the same way, fastfilm/graphed.py)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=False)


def _set_impl(module: nn.Module, impl: str) -> None:
    """`impl` for this site only; op sites inside it (a ResBlock's CoordConv) keep theirs."""
    module.kernels = impl


def make_fwd_bwd(
    module: nn.Module, args: Sequence[Any], impl: str, amp_dtype: torch.dtype | None, seed: int = 0
) -> Callable[[], None]:
    """A closure running forward + backward of a training-mode copy of `module` with implementation `impl` on
    copies of `args` (requiring grad where the recorded input did), against a fixed random upstream gradient."""
    m = copy.deepcopy(module).train()
    _set_impl(m, impl)
    inputs = [a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
    device = next(m.parameters()).device
    with _autocast(device, amp_dtype):
        out = m(*inputs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float32).to(device=device, dtype=out.dtype)
    grad = grad.contiguous(memory_format=torch.channels_last) if _layout(out) == "channels_last" else grad

    def run() -> None:
        with _autocast(device, amp_dtype):
            y = m(*inputs)
        y.backward(grad)

    run.impl = impl  # what it runs (for a `measure` timer)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], None],
    device: torch.device,
    *,
    warmup: int = 3,
    reps: int = 20,
    groups: int = 3,
    graphed: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per call of `fn`: the best of `groups` means over `reps` calls, after `warmup` calls. `graphed`: the
    `reps` calls are captured into one CUDA graph that each group replays (CUDA only)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    replay = None
    if graphed:
        if device.type != "cuda":
            raise ValueError("time_call: graphed timing needs a CUDA device")
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # the warm-up on a side stream, as torch.cuda.graphs asks
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # through fastfilm/core/cuda_graph.py: a failed capture names the op that broke it
        capture(graph, lambda: [fn() for _ in range(reps)])
        replay = graph.replay
    best = float("inf")
    for _ in range(groups):
        _sync(device)
        t0 = clock()
        if replay is not None:
            replay()
        else:
            for _ in range(reps):
                fn()
        _sync(device)
        best = min(best, (clock() - t0) / reps)
    return best


def measure(
    model: FiLMModel,
    batch: dict[str, torch.Tensor],
    candidates: Iterable[str],
    amp_dtype: torch.dtype | None,
    *,
    graphed: bool = False,
    timer: Callable[[Callable[[], None], torch.device, bool], float] | None = None,
    progress: Callable[[str], None] | None = None,
    timing: dict[str, int] | None = None,
) -> list[Pick]:
    """Time every candidate at every group of op sites of `model` (see the module docstring). `timer(fn, device,
    graphed)` replaces `time_call` (tests); `timing` is passed on to `time_call` (warmup, reps, groups)."""
    candidates = list(dict.fromkeys(["reference", *candidates]))
    device = next(model.parameters()).device
    sites = dict(op_sites(model))
    try:  # the inputs as the model's own implementations produce them (their layouts included)
        inputs = record_inputs(model, batch, amp_dtype)
    except Exception:  # noqa: BLE001 (a candidate failing at this run's shapes: measured below, and left out)
        inputs = record_inputs(model, batch, amp_dtype, reference=True)
    groups: dict[str, Pick] = {}
    for name, args in inputs.items():
        key = site_key(sites[name], args)
        groups.setdefault(key, Pick(key, [])).sites.append(name)
    timer = timer or (lambda fn, dev, g: time_call(fn, dev, graphed=g, **(timing or {})))
    for key, pick in groups.items():
        module, args = sites[pick.sites[0]], inputs[pick.sites[0]]
        in_graph = graphed
        for impl in candidates:
            if progress is not None:
                progress(f"{key}: {impl}")
            try:
                pick.seconds[impl] = timer(make_fwd_bwd(module, args, impl, amp_dtype), device, in_graph)
            except Exception as e:  # a candidate that cannot run (or be captured) here is left out
                if impl != "reference":
                    pick.errors[impl] = _why(e)
                elif in_graph:  # the reference itself cannot be captured: this group is timed eagerly
                    pick.errors["graph"] = f"reference not capturable, timed eagerly ({_why(e)})"
                    in_graph = False
                    pick.seconds[impl] = timer(make_fwd_bwd(module, args, impl, amp_dtype), device, False)
                else:
                    raise
        pick.choice = choose(pick.seconds)
    return list(groups.values())


def _why(e: Exception) -> str:
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def choose(seconds: dict[str, float]) -> str:
    """The fastest candidate; the reference unless another beats it by more than TIE."""
    best = min(seconds, key=seconds.get)
    if best != "reference" and seconds[best] >= seconds["reference"] * (1 - TIE):
        return "reference"
    return best


def apply(model: nn.Module, picks: Iterable[Pick]) -> None:
    """Set each site's implementation to its group's choice."""
    sites = dict(op_sites(model))
    for p in picks:
        for name in p.sites:
            if name not in sites:
                raise KeyError(f"kernel picks: the model has no op site '{name}'")
            _set_impl(sites[name], p.choice)


def synthetic_batch(model: FiLMModel, batch_size: int, device: torch.device, length: int = 12) -> dict:
    """A batch of the run's shapes for the measurement: images (or features) of the model's input size, questions
    of `length` tokens (the op sites' shapes do not depend on the question length)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    if cfg.stem == "pixels":
        shape = (batch_size, 3, cfg.image_size, cfg.image_size)
    else:
        shape = (batch_size, cfg.feature_channels, cfg.feature_size, cfg.feature_size)
    vocab = model.generator.encoder_embed.num_embeddings
    q = torch.randint(4, max(vocab, 5), (batch_size, length), generator=g)
    q[:, 0], q[:, -1] = 1, 2
    return {
        "image": torch.rand(shape, generator=g).to(device),
        "question": q.to(device),
        "length": torch.full((batch_size,), length, dtype=torch.int64),
    }


def pick(
    model: FiLMModel,
    batch_size: int,
    candidates: Iterable[str],
    amp_dtype: torch.dtype | None,
    *,
    graphed: bool,
    rank: int = 0,
    run_dir: str | None = None,
    say: Callable[[str], None] = print,
    timing: dict[str, int] | None = None,
) -> list[Pick]:
    """Measure on rank 0 (`measure`), share the choice with every rank, apply it to `model`, print one line per
    group and write `kernel_picks.json` into `run_dir` (rank 0)."""
    import torch.distributed as dist

    device = next(model.parameters()).device
    picks = None
    if rank == 0:
        t0 = time.perf_counter()
        batch = synthetic_batch(model, batch_size, device)
        picks = measure(model, batch, candidates, amp_dtype, graphed=graphed, timing=timing)
        where = "inside a CUDA graph" if graphed else "eagerly"
        say(f"fastfilm: kernels: measured {len(picks)} op shapes {where} in {time.perf_counter() - t0:.1f} s")
        for p in picks:
            say(f"fastfilm: {p.line()}")
        if run_dir:
            write_picks(os.path.join(run_dir, "kernel_picks.json"), picks, graphed)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [picks]
        dist.broadcast_object_list(box, src=0)
        picks = box[0]
    apply(model, picks)
    return picks


def write_picks(path: str, picks: Iterable[Pick], graphed: bool) -> None:
    """The measurements as JSON (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"graphed": graphed, "picks": [asdict(p) for p in picks]}, f, indent=1)
    os.replace(tmp, path)
