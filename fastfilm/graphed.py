"""Graph mode: the whole training step at static shapes, captured once per shape as a CUDA graph and replayed.

A step of the paper model launches ~720 kernels for ~1 ms of FLOPs (723 per step on an H200: bench/RESULTS_GPU.md):
on a GPU it is bound by the host, not the device. `GraphedTrainStep` records forward, float32 loss, backward,
gradient clipping, the global gradient norm, Adam and the zeroing of the gradients as one `torch.cuda.CUDAGraph`
per static shape, and a step is then a few input copies and one graph launch.

What graph mode needs, and how it gets it:
- Static shapes. The batch size is fixed (the training loader drops the last partial batch); the questions are
  padded with <NULL> to a bucket, the smallest multiple of 8 (capped at the split's longest question) that holds
  the batch's longest, so one graph per bucket (six on CLEVR) and per kind of micro-step (with gradient
  accumulation: the micro-steps before the boundary and the boundary's, which also steps the optimizer).
- Static memory. Inputs are copied into buffers that live as long as the graph (`copy_(non_blocking=True)`);
  gradients are allocated once, accumulated in place and zeroed inside the graph; outputs (loss, logits, grad
  norm) are the graph's own tensors, valid until the next step.
- No host synchronisation inside the step. The question encoder reads the padded bucket and gathers each
  question's state at its last real token with the lengths on the device (`FiLMGen.static_encode`); clipping
  and the norm stay on the device; the trainer reads the loss and the norm only when it logs and agrees.
- A capturable optimizer: torch's fused Adam/AdamW with `capturable=True`; its learning rate is a device tensor
  while the step is captured and replayed, refreshed from `param_groups` (which keep Python floats, so
  checkpoints and schedulers see what they always saw) when a scheduler moved it. Betas and weight decay are
  read at capture: a schedule that moves them (OneCycle's momentum) is not supported.
- BatchNorm running stats and `num_batches_tracked` are updated in place by kernels inside the graph; dropout
  draws from the CUDA generator's graph-safe Philox state (a new offset per replay).
- Warm-up: the first `warmup` steps of each shape run eagerly on a side stream (real training steps: lazy state,
  cuDNN/cuBLAS plans and `torch.compile`'s compilation happen there); the next one is captured and replayed.
  Capture uses `capture_error_mode="thread_local"`, so DALI's threads may keep using the GPU meanwhile. One DALI
  thread may not: the one that releases freed output buffers calls cudaDeviceSynchronize, which CUDA refuses
  while any stream captures; DALI 2.4 expects that refusal (error 900: it puts the buffers back and retries 1 ms
  later, seen in its binary), but whether the refused call also invalidates our capture has not been seen on a
  GPU. So each capture starts on an idle device (that thread's pending sync returns at once), and a failed
  capture is said in one line and tried once more at that shape's next step; a second failure turns capture
  off for the run (the step stays correct, only slower). The first GPU run with DALI will show which happens.

Without a CUDA device (or with `capture=False`) the same step runs eagerly at the same static shapes: that is
what the CPU tests check (resume, accumulation, fp16 loss scaling, BN stats), and graph mode replays exactly
those kernels. fp16's `GradScaler` runs eagerly here (its Python bookkeeping is not captured): fp16 falls back.
Several ranks (ZeRO stage 0; opt-in with `train.cuda_graphs: true`, `auto` keeps DeepSpeed's step there): the
gradients are views into one flat float32 buffer, all-reduced and averaged at the boundary inside the step (one
collective, captured with the rest on NCCL); BatchNorm running stats are averaged by the trainer after each step,
as without graphs. Not supported (the trainer falls back to DeepSpeed's engine step with one log line): ZeRO
stages > 0, optimizers other than torch's fused Adam/AdamW (apex's), bidirectional encoders.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fastfilm.core.cuda_graph import capture
from fastfilm.model import NULL


@dataclass
class StepResult:
    """What one micro-batch's `train_step` returns (tensors detached, still on the device: no host sync)."""

    loss: torch.Tensor
    logits: torch.Tensor
    answers: torch.Tensor
    boundary: bool  # an optimizer step was taken (the last micro-batch of a gradient accumulation)
    grad_norm: float | None  # at a boundary when asked for: the global gradient norm before the step
    lr: float | None = None  # at a boundary: the learning rate the step applied (a scheduler moves it after)


def film_regulariser(gammas: torch.Tensor, betas: torch.Tensor, baseline: float) -> torch.Tensor:
    """TADAM-style L2 pull of Δγ and β toward zero (beyond the paper; weight `train.film_reg_weight`)."""
    return (gammas.float() - baseline).pow(2).mean() + betas.float().pow(2).mean()


BUCKET = 8  # question lengths are padded up to a multiple of this (capped at the split's longest)
# failed captures before graph mode turns capture off for the run (the first may be transient)
CAPTURE_TRIES = 2


def length_buckets(max_len: int, step: int = BUCKET) -> list[int]:
    """The static question lengths: multiples of `step` below `max_len`, then `max_len` (46 → 8, 16, …, 40, 46)."""
    if max_len < 1:
        raise ValueError(f"length_buckets: max_len must be >= 1, got {max_len}")
    return [*range(step, max_len, step), max_len]


def bucket_for(t: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `t` tokens (`t` itself beyond the largest: one more static shape)."""
    return next((b for b in buckets if b >= t), t)


def pad_questions(questions: torch.Tensor, t: int) -> torch.Tensor:
    """Questions [N, T'] padded with <NULL> to [N, t] (t >= T')."""
    return questions if questions.shape[1] == t else F.pad(questions, (0, t - questions.shape[1]), value=NULL)


def unsupported(engine, optimizer, model_cfg, world: int = 1, asked: bool = False) -> str | None:
    """Why this run cannot take graph mode's static-shape step at all (None: it can). Several ranks need it asked
    for (`train.cuda_graphs: true`): their all-reduce inside a captured graph has not been measured on GPUs yet."""
    if world != 1 and not asked:
        return f"{world} ranks under 'auto' (with several ranks graph mode is opt-in: train.cuda_graphs=true)"
    if engine.zero_optimization_stage() != 0:
        return f"ZeRO stage {engine.zero_optimization_stage()} (graph mode needs stage 0)"
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or not all(
        g.get("fused") for g in optimizer.param_groups
    ):
        return f"optimizer {type(optimizer).__module__}.{type(optimizer).__name__} (graph mode needs torch's fused Adam)"
    if model_cfg.bidirectional:
        return "a bidirectional encoder (the static encoder reads the padding)"
    return None


def will_capture(cfg, engine, optimizer, scaler, device: torch.device, world: int = 1) -> bool:
    """Whether `trainer_step` will capture this run's step into CUDA graphs (what kernel_pick times in)."""
    want = cfg.train.cuda_graphs
    if device.type != "cuda" or want is False or scaler is not None:
        return False
    return unsupported(engine, optimizer, cfg.model, world, asked=want is True) is None


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dense(p: torch.Tensor) -> bool:
    """Whether `p` covers exactly numel() elements of memory with its strides (contiguous in some dim order)."""
    dims = sorted((st, sz) for st, sz in zip(p.stride(), p.shape) if sz > 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


class GraphedTrainStep:
    """One micro-step of training at static shapes; captured and replayed as CUDA graphs when `capture`.

    `model`: the FiLM model; `forward` (default `model.forward`, e.g. `compiled_forward(model)`) is called as
    `forward(images, questions, lengths, return_film=True, static=True)`; the optimizer's parameters train. `__call__(batch,
    boundary)` returns (loss, logits, answers, grad_norm or None), device tensors owned by the step: valid until
    the next call. `boundary`: this micro-batch ends a gradient accumulation (clip, norm, optimizer step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        grad_accum: int = 1,
        clip: float = 0.0,
        film_reg_weight: float = 0.0,
        gamma_baseline: float = 1.0,
        max_len: int = 0,
        capture: bool | None = None,
        warmup: int = 2,
        forward=None,
        world: int | None = None,
    ):
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        # `model.forward`, not `model(...)`: DeepSpeed's forward hooks on the engine's module would run at capture
        # only, and its throughput timer synchronises the device in them once the engine has stepped.
        self.forward = forward if forward is not None else model.forward
        self.amp_dtype, self.scaler, self.gas, self.clip = amp_dtype, scaler, grad_accum, clip
        self.film_reg_weight, self.gamma_baseline = film_reg_weight, gamma_baseline
        self.buckets = length_buckets(max_len) if max_len else []
        self.capture = (self.device.type == "cuda") if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("GraphedTrainStep: capture needs a CUDA device")
        if self.capture and scaler is not None:
            raise ValueError("GraphedTrainStep: fp16 loss scaling is not captured (use capture=False)")
        self.warmup = warmup
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.world = world if world is not None else _world_size()
        self.flat = None
        if self.world > 1:  # one flat gradient buffer, all-reduced in one collective (captured too, on NCCL)
            self.flat = torch.zeros(
                sum(p.numel() for p in self.params), dtype=torch.float32, device=self.device
            )
            off = 0
            for p in self.params:
                if p.dtype != torch.float32 or not _dense(p):
                    raise ValueError("GraphedTrainStep: several ranks need dense float32 parameters")
                p.grad = self.flat.as_strided(p.shape, p.stride(), off)  # the parameter's own layout
                off += p.numel()
        for p in self.params:  # static gradients: accumulated in place, zeroed inside the step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.inputs: dict[tuple, dict[str, torch.Tensor]] = {}
        self.outputs: dict[tuple, tuple] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.warm: Counter = Counter()
        self.pool = None
        self.captures = 0  # graphs captured so far (the bench and the tests read it)
        self.failed_captures = 0
        if self.capture:
            for g in optimizer.param_groups:
                g["capturable"] = True
            self.stream = torch.cuda.Stream(self.device)
            self.lr = [
                torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)
                for g in optimizer.param_groups
            ]
            self.lr_host = [float(g["lr"]) for g in optimizer.param_groups]

    # ----------------------------------------------------------------------------------------- inputs
    def key(self, batch: dict[str, Any], boundary: bool) -> tuple:
        n, t = batch["question"].shape
        return (n, bucket_for(t, self.buckets) if self.buckets else t, bool(boundary))

    def _load(self, key: tuple, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Copy the batch into the static buffers of its shape (allocated at its first batch)."""
        t = key[1]
        src = {
            "image": batch["image"],
            "question": pad_questions(batch["question"], t),
            "length": torch.as_tensor(batch["length"]),
            "answer": batch["answer"],
        }
        bufs = self.inputs.get(key)
        if bufs is None:
            fmt = torch.channels_last if self._channels_last() else torch.contiguous_format
            bufs = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in src.items()}
            bufs["image"] = torch.empty(
                src["image"].shape, dtype=src["image"].dtype, device=self.device, memory_format=fmt
            )
            bufs["length"] = bufs["length"].to(torch.int64)
            self.inputs[key] = bufs
        for k, v in src.items():
            if v.shape != bufs[k].shape:
                raise ValueError(
                    f"graph mode: batch '{k}' of shape {list(v.shape)}, expected {list(bufs[k].shape)}"
                )
            bufs[k].copy_(v, non_blocking=True)
        return bufs

    def _channels_last(self) -> bool:
        net = getattr(self.model, "net", None)
        return bool(net is not None and net.channels_last())

    # -------------------------------------------------------------------------------------- the step
    def compute(self, b: dict[str, torch.Tensor], boundary: bool):
        """The step itself (what is captured): forward under autocast (no weight-cast cache: a graph must not
        keep casts made outside it), float32 loss, backward into the static gradients, and at the boundary the
        pre-clip global norm, clipping and the optimizer step, then the gradients zeroed in place."""
        ac = (
            torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with ac:
            logits, (gammas, betas) = self.forward(
                b["image"], b["question"], b["length"], return_film=True, static=True
            )
        loss = F.cross_entropy(logits.float(), b["answer"])
        if self.film_reg_weight > 0:
            loss = loss + self.film_reg_weight * film_regulariser(gammas, betas, self.gamma_baseline)
        scaled = loss / self.gas  # as DeepSpeed's engine.backward
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        norm = None
        if boundary:
            if self.flat is not None:  # the ranks' mean gradient, as DeepSpeed's all-reduce at ZeRO stage 0
                torch.distributed.all_reduce(self.flat)
                self.flat.div_(self.world)
            if self.scaler is not None and self.clip > 0:
                self.scaler.unscale_(self.optimizer)
            if self.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            else:
                norm = torch.nn.utils.get_total_norm(self.grads)
                if self.scaler is not None:
                    norm = norm / self.scaler._get_scale_async()
            self._optimizer_step()
            torch._foreach_zero_(self.grads)
        return loss.detach(), logits.detach(), b["answer"], norm

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        if not self.capture:
            self.optimizer.step()
            return
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        try:  # the device learning rate inside the step; param_groups keep their floats outside it
            for g, lr in zip(groups, self.lr):
                g["lr"] = lr
            self.optimizer.step()
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr

    def _refresh_lr(self) -> None:
        for i, g in enumerate(self.optimizer.param_groups):
            lr = float(g["lr"])
            if lr != self.lr_host[i]:  # a scheduler moved it: one fill kernel, no host sync
                self.lr[i].fill_(lr)
                self.lr_host[i] = lr

    def __call__(self, batch: dict[str, Any], boundary: bool = True):
        key = self.key(batch, boundary)
        bufs = self._load(key, batch)
        if not self.capture:
            return self.compute(bufs, key[2])
        self._refresh_lr()
        graph = self.graphs.get(key)
        if graph is None and self.warm[key] < self.warmup:
            self.warm[key] += 1
            cur = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(cur)
            with torch.cuda.stream(self.stream):
                out = self.compute(bufs, key[2])
            cur.wait_stream(self.stream)
            for t in out:
                if t is not None:
                    t.record_stream(cur)
            return out
        if graph is None:
            graph = self._capture(key, bufs)
            # capture failed: this step runs uncaptured (and, after CAPTURE_TRIES failures, all later ones)
            if graph is None:
                return self.compute(bufs, key[2])
        graph.replay()
        return self.outputs[key]

    def _capture(self, key: tuple, bufs: dict[str, torch.Tensor]) -> torch.cuda.CUDAGraph | None:
        """Capture the step of `key` (nothing runs during a capture: the caller replays it). A failure is said in
        one line; the first is retried at the shape's next step (a transient one: another thread's device sync
        during the capture), the `CAPTURE_TRIES`-th switches capture off for good (an op that cannot be
        captured): the step stays correct, it only loses the graphs."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)  # an idle device: no other thread's device sync still in flight
        try:
            # on the warm-up stream (its cuBLAS/cuDNN workspaces exist), DALI's threads free to use the GPU
            self.outputs[key] = capture(
                graph,
                lambda: self.compute(bufs, key[2]),
                pool=self.pool,
                stream=self.stream,
                capture_error_mode="thread_local",
            )
        except Exception as e:  # noqa: BLE001 (reported, then the uncaptured step)
            self.failed_captures += 1
            torch.cuda.synchronize(self.device)
            if self.failed_captures < CAPTURE_TRIES:
                print(
                    f"fastfilm: graph mode: capturing the step failed ({e}); this step runs uncaptured, the "
                    "capture is tried once more at this shape's next step",
                    flush=True,
                )
                return None
            print(
                f"fastfilm: graph mode: capturing the step failed again ({e}); it runs uncaptured from here on",
                flush=True,
            )
            self.capture, self.graphs, self.outputs = False, {}, {}
            return None
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = graph
        self.captures += 1
        return graph


# ------------------------------------------------------------------------------------------ the trainer's hook
def _say(run, msg: str) -> None:
    if run.is_main:
        print(f"fastfilm: {msg}", flush=True)


def compiled_forward(model: torch.nn.Module, fullgraph: bool = True, backend: str = "inductor"):
    """`train.compile`: the model's whole forward under torch.compile (the question encoder's RNN included:
    dynamo's `allow_rnn`); fullgraph with the reference kernels. The module itself is unchanged (its state-dict,
    its checkpoints); graph mode calls the compiled forward, and its warm-up steps are where it compiles."""
    import torch._dynamo

    torch._dynamo.config.allow_rnn = True
    return torch.compile(model.forward, fullgraph=fullgraph, dynamic=False, backend=backend)


def trainer_step(run):
    """The trainer's step function for `run` (a `fastfilm.train.Run`, after any resume): graph mode's step when
    `train.cuda_graphs` asks for it and the run supports it, else None (DeepSpeed's `engine.backward` /
    `engine.step`, `fastfilm.train.train_step`). Says in one line what it chose whenever that differs from what was
    asked (`true` on a CPU: the static-shape step runs eagerly; something unsupported: the engine step)."""
    cfg, engine = run.cfg, run.engine
    want = cfg.train.cuda_graphs
    cuda = run.device.type == "cuda"
    if want is False or (want == "auto" and not cuda):
        if cfg.train.compile is True:
            _say(run, "train.compile needs graph mode's step (train.cuda_graphs); the model runs eagerly")
        return None
    why = unsupported(engine, run.optimizer, cfg.model, run.world, asked=want is True)
    if why is not None:
        _say(run, f"train.cuda_graphs: not with {why}; DeepSpeed's engine step runs instead")
        return None
    capture = cuda and run.scaler is None
    if not cuda:
        _say(run, "train.cuda_graphs: no CUDA device; graph mode's static-shape step runs eagerly")
    elif not capture:
        _say(run, "train.cuda_graphs: fp16 loss scaling is not captured; graph mode's step runs eagerly")
    fwd = (
        compiled_forward(engine.module, cfg.kernels.mode == "reference")
        if cfg.train.compile is True
        else None
    )
    loader = run.train_loader
    max_len = int(loader.arrays["questions"].shape[1]) if hasattr(loader, "arrays") else 0
    step = GraphedTrainStep(
        engine.module,
        run.optimizer,
        device=run.device,
        amp_dtype=run.amp_dtype,
        scaler=run.scaler,
        grad_accum=engine.gradient_accumulation_steps(),
        clip=float(engine.gradient_clipping() or 0.0),
        film_reg_weight=cfg.train.film_reg_weight,
        gamma_baseline=cfg.model.gamma_baseline,
        max_len=max_len,
        capture=capture,
        forward=fwd,
    )

    def run_step(batch: dict[str, Any], want_grad_norm: bool = False) -> StepResult:
        boundary = engine.is_gradient_accumulation_boundary()
        lr = float(run.optimizer.param_groups[0]["lr"]) if boundary else None
        loss, logits, answers, norm = step(batch, boundary)
        # DeepSpeed's bookkeeping of engine.step (its checkpoints save these counters), and its scheduler
        if boundary:
            if engine.lr_scheduler is not None:
                engine.lr_scheduler.step()
            engine.global_steps += 1
            engine.global_samples += engine.train_batch_size()
        engine.micro_steps += 1
        grad_norm = float(norm) if boundary and want_grad_norm and norm is not None else None
        return StepResult(loss, logits, answers, boundary, grad_norm, lr)

    run_step.graphed = step  # for tests and the bench
    return run_step
