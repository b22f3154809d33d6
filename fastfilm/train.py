"""Train FiLM: `deepspeed fastfilm/train.py --config configs/clevr.json` (N ranks) or `fastfilm train` (one).

Read top to bottom: `setup` (preflight checks, ranks, DALI loaders, model, `deepspeed.initialize`, resume) →
`train_loop`: `train_step` per micro-batch (forward, loss, `engine.backward`, `engine.step`), and per optimizer
step the logging, the ranks' agreement on stopping (`agree`), `evaluate` and `save` (`last`, `best`), early
stopping. Steps are optimizer steps throughout: `max_steps`, `eval_every`, `log_every`, `sync_every` and the
saved position count them, whatever `gradient_accumulation_steps` is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make `fastfilm` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from fastfilm.core.config import Config, ConfigError, add_config_args, load_config
from fastfilm.core.errors import FastfilmError, OneLineParser, progress_off, with_one_line_errors
from fastfilm.core.kernel_mode import check_kernels_mode
from fastfilm.core.precision import autocast_dtype
from fastfilm.evaluate import evaluate as evaluate_model
from fastfilm.files import checkpoint as ckpt
from fastfilm.graphed import StepResult, film_regulariser  # noqa: F401  (fastfilm.train.StepResult: the step's result)
from fastfilm.model import FiLMModel, count_parameters, layout_for


class TrainingStopped(FastfilmError):
    """Training could not go on (a non-finite loss); the last good checkpoint is kept."""

    label = "training stopped"
    exit_status = 3


@dataclass
class TrainState:
    """Where a run stands: what each checkpoint's `trainer_state.json` holds, and what `--resume` restores."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    questions: int = 0  # of the epoch's global order consumed, by any layout: the loader's position
    order_batch: int = 0  # data.bucket_by_length: the global batch the epoch's order was drawn for
    best_acc: float = -1.0
    best_step: int = 0
    evals_since_best: int = 0
    grad_scaler: dict | None = None  # fp16: the loss scaler's state (DeepSpeed's checkpoint leaves it out)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TrainState:
        """The state saved in `where` (a trainer_state.json); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("batch"):  # before the position was counted in questions: batches of that run's own layout
            raise ckpt.CheckpointError(
                f"{where}: an older checkpoint whose position is batch {d['batch']} of its own shard layout, "
                "which this version cannot map to questions; resume it with the fastfilm that wrote it"
            )
        d = {k: v for k, v in d.items() if k != "batch"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ckpt.CheckpointError(f"{where}: unknown trainer-state keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["grad_scaler"] is None:
            del d["grad_scaler"]
        return d


@dataclass
class Run:
    """Everything a set-up training run holds (built by `setup`, read by the loop and its parts)."""

    cfg: Config
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    amp_dtype: torch.dtype | None
    device: torch.device
    rank: int
    world: int
    vocab: dict
    train_loader: Any
    val_loader: Any
    logger: ckpt.RunLogger
    t_start: float
    signal: list[str] = field(default_factory=list)  # set by SIGTERM / SIGINT
    nonfinite: torch.Tensor | None = None  # any non-finite loss since the last agreement (on the device)
    saved_at: dict[str, int] = field(default_factory=dict)  # tag → step it holds
    lock: ckpt.RunLock | None = None  # rank 0's ownership of the run folder, for the run's life

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.train.run_dir, "checkpoints")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def minutes(self) -> float:
        return (time.time() - self.t_start) / 60


# --------------------------------------------------------------------------------------------- set-up
def use_this_venvs_ninja() -> None:
    """Put this interpreter's `bin` folder first on PATH when it holds `ninja`.

    DeepSpeed JIT-builds its C++ ops on a CPU where a config asks for one (e.g. the CPU Adam of ZeRO-Offload; its
    shared-memory all-reduce is skipped: `skip_deepspeed_shm_op`), and torch runs whichever `ninja` PATH finds. With
    two ninja versions on a machine (the venv's, from pip, and the system's), each switch between them rebuilds the
    op (about 45 s on 2 cores): a launcher run and a plain run would take turns paying for it.
    """
    from fastfilm.auto import use_per_cpu_build_dirs

    use_per_cpu_build_dirs()  # and build/code caches per CPU kind (the op is built with -march=native)
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op in `init_distributed`.

    DeepSpeed's torch backend builds and loads `deepspeed_shm_comm` on every CPU init: C++ compiled by ninja, about a
    minute on 2 cores, once per machine *and venv* (the build folder is per CPU kind, the build command holds the
    venv's include paths, so two checkouts on one machine rebuild it in turn). Only DeepSpeed's tensor-parallel
    inference calls it (`inference_all_reduce`, which uses the process group without it); training's all-reduces
    go through gloo either way. `deepspeed.ops.__compatible_ops__` is DeepSpeed's own per-process table of the ops it
    may build (probed once, kept in the module): marked incompatible, `build_shm_op` returns None.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """Join the process group (gloo on CPU, nccl on GPU); works with and without the deepspeed launcher."""
    import deepspeed
    import torch.distributed as dist

    use_this_venvs_ninja()
    skip_deepspeed_shm_op()
    if "RANK" not in os.environ:  # plain `python fastfilm/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.train.dist_timeout_s)
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def preflight(cfg: Config) -> dict:
    """Checks that need the launch environment or the disk, before any work starts (ConfigError / DataError):
    the batch keys against the number of ranks, the kernels against the machine, the data folders. Returns the
    cache's vocabulary (read and hash-checked once here)."""
    from fastfilm.data import load_vocab
    from fastfilm.data.prep import split_file

    cfg.resolve_batch(int(os.environ.get("WORLD_SIZE", "1")))
    ckpt.check_zero_stage(cfg)
    check_kernels_mode(cfg)
    run_dir = cfg.train.run_dir
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"{cfg.source}: train.run_dir: '{run_dir}' exists and is not a folder")
    dc = cfg.data
    if not os.path.isdir(dc.cache):
        raise ConfigError(
            f"{cfg.source}: data.cache: no such folder '{dc.cache}' "
            f"(make it with `fastfilm prep --clevr {dc.root} --out {dc.cache}`)"
        )
    if dc.image_source in ("png", "features") and not os.path.isdir(dc.root):
        raise ConfigError(
            f"{cfg.source}: data.root: no such folder '{dc.root}' (data.image_source={dc.image_source!r} "
            "reads the CLEVR folder)"
        )
    vocab = load_vocab(dc.cache)  # a missing or edited vocabulary fails here, naming the file
    for key in ("train_split", "val_split"):
        path = split_file(dc.cache, getattr(dc, key))
        if not os.path.isfile(path):
            raise ConfigError(
                f"{cfg.source}: data.{key}: '{getattr(dc, key)}' is not prepared in {dc.cache} ({path} not found)"
            )
    return vocab


def build_optimizer(model: torch.nn.Module, ds: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay as the paper (apex's fused Adam on a GPU when importable, else torch's
    fused Adam, on a GPU or a CPU), from the (default-merged) DeepSpeed section's `optimizer`."""
    opt = ds["optimizer"]
    p = opt["params"]
    kwargs = {"lr": p["lr"], "betas": tuple(p["betas"]), "eps": p["eps"], "weight_decay": p["weight_decay"]}
    decoupled = str(opt["type"]).lower() == "adamw"
    cuda = next(model.parameters()).is_cuda or torch.cuda.is_available()
    params = [q for q in model.parameters() if q.requires_grad]  # frozen by train.trainable: left out
    if cuda:
        try:
            from apex.optimizers import FusedAdam  # optional: see README

            return FusedAdam(params, adam_w_mode=decoupled, **kwargs)
        except ImportError:
            pass
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, fused=True, **kwargs)  # one kernel per step (CPU: 0.09 s, not 0.9 s, for 59 M params)


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed section as handed to `deepspeed.initialize`.

    The optimizer is built here (see `build_optimizer`), so its section is removed. Mixed precision runs as
    DeepSpeed's `torch_autocast`: parameters, BN buffers and the optimizer stay float32, convs and GEMMs run in
    the low precision. `bf16` needs nothing more; `fp16` adds DeepSpeed's dynamic loss scaling (a
    `torch.amp.GradScaler`: steps whose gradients overflow are skipped and the scale backs off). DeepSpeed's own
    `bf16`/`fp16` modes would cast BN's affine parameters but not its float32 running stats, so they are not used.

    Gradients are reduced across ranks in float32 at every ZeRO stage, as at stage 0: DeepSpeed's autocast would
    reduce the gradients of `nn.Linear`/`nn.Conv*` parameters in the low precision under ZeRO (only those module
    classes, so not the fused kernels' parameters). `torch_autocast.lower_precision_safe_modules` in the DeepSpeed
    section opts back in to that (half the gradient traffic of those parameters, rounded to bf16/fp16).
    """
    ds = json.loads(json.dumps(cfg.deepspeed))
    ds.pop("optimizer", None)
    dtype = autocast_dtype(cfg.deepspeed)
    if dtype is not None:
        user = ds.get("torch_autocast") or {}
        ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": str(dtype).replace("torch.", ""),
            "lower_precision_safe_modules": user.get("lower_precision_safe_modules", []),
        }
    return ds


def forget_previous_autocast() -> None:
    """Clear the autocast state DeepSpeed keeps in module globals from an earlier engine of this process.

    DeepSpeed (0.19) records an engine's `torch_autocast` dtype in `deepspeed.runtime.torch_autocast` and never clears
    it: a later engine without autocast in the same process (a sweep, a notebook, the test suite) would inherit it,
    e.g. a float32 ZeRO engine built after an fp16 one got fp16's GradScaler (gradients and the logged grad norm
    scaled by 2**16). An engine with autocast sets it again in `deepspeed.initialize`.
    """
    from deepspeed.runtime import torch_autocast

    if hasattr(torch_autocast, "TORCH_AUTOCAST_INITIALIZED"):
        torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
    if hasattr(torch_autocast, "TORCH_AUTOCAST_DTYPE"):
        torch_autocast.TORCH_AUTOCAST_DTYPE = None


def memory_format(cfg: Config, device: torch.device, zero_stage: int = 0) -> str:
    """`model.memory_format` resolved: `auto` is channels_last on a GPU, channels_first on a CPU. ZeRO stages > 0
    keep channels_first (their flat parameter buffers are NCHW views), with one line when channels_last was asked."""
    fmt = layout_for(cfg.model.memory_format, device)
    if fmt == "channels_last" and zero_stage > 0:
        if cfg.model.memory_format == "channels_last" and int(os.environ.get("RANK", "0")) == 0:
            print(
                "fastfilm: model.memory_format: channels_last needs ZeRO stage 0; training in channels_first"
            )
        fmt = "channels_first"
    return fmt


def set_memory_format(engine, optimizer: torch.optim.Optimizer, fmt: str) -> None:
    """Convert the model's 4-D weights (and the optimizer states of those weights) to `fmt`, in place.

    Done after `deepspeed.initialize`, whose parameter broadcast views each parameter as bytes and refuses a
    channels_last one ("self.stride(-1) must be 1 to view Float as Byte"). `Module.to` swaps `param.data`, so the
    optimizer keeps the same parameter objects. Optimizer states (a checkpoint of the other layout restored into
    this one) are given their parameter's strides: fused Adam walks parameter and states as flat memory."""
    if engine.zero_optimization_stage() > 0:  # flat NCHW buffers (memory_format() kept channels_first)
        return
    if fmt == "channels_last":  # channels_first: the model was built so
        engine.module.to(memory_format=torch.channels_last)
    for p, st in optimizer.state.items():
        for k, v in list(st.items()):
            if torch.is_tensor(v) and v.shape == p.shape and v.dim() == 4 and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def build_engine(cfg: Config, vocab: dict, device: torch.device, init: bool = True):
    """The FiLM model wrapped by `deepspeed.initialize`; returns (engine, optimizer, fp16 loss scaler or None).
    `init=False` (a resumed run) skips `train.init_from`: the checkpoint holds the weights."""
    import deepspeed

    model = FiLMModel(
        cfg.model,
        len(vocab["question_token_to_idx"]),
        len(vocab["answer_token_to_idx"]),
        kernels=cfg.kernels.mode,
    )
    # train.init_from (weights of a run, an exported model or an original checkpoint; the word embedding grows
    # for appended words) and train.trainable (the frozen part gets requires_grad=False): fastfilm/init_from.py
    from fastfilm.init_from import describe, prepare_model

    prepared = prepare_model(model, cfg.train, vocab, load_weights=init)
    if describe(prepared, cfg.train) and (
        not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    ):
        print(describe(prepared, cfg.train), flush=True)
    model.to(device)
    optimizer = build_optimizer(model, cfg.deepspeed)
    forget_previous_autocast()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg)
    )
    set_memory_format(engine, optimizer, memory_format(cfg, device, engine.zero_optimization_stage()))
    if engine.zero_optimization_stage() == 0 and torch.distributed.get_world_size() == 1:
        engine.enable_backward_allreduce = (
            False  # nothing to average over one rank (saves flattening every grad)
        )
    return engine, optimizer, configure_loss_scaler(engine, cfg, device)


def configure_loss_scaler(engine, cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """The fp16 loss scaler DeepSpeed made (None without fp16), set from `deepspeed.fp16`'s
    `initial_scale_power` (default 16) and `loss_scale_window` (default 1000)."""
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is None:
        return None
    fp16 = cfg.deepspeed.get("fp16", {})
    scaler = torch.amp.GradScaler(
        device=device.type,
        init_scale=2.0 ** fp16.get("initial_scale_power", 16),
        growth_interval=int(fp16.get("loss_scale_window", 1000)),
    )
    engine.torch_autocast_z0_gradscaler = scaler
    return scaler


def setup(cfg: Config, resume: bool, overwrite: bool = False) -> tuple[Run, TrainState]:
    """Preflight, the run folder claimed (rank 0: see `ckpt.claim_run_dir`), process group, this rank's loaders,
    the engine, and the state to start from."""
    t_start = time.time()
    vocab = preflight(cfg)
    lock = ckpt.claim_run_dir(
        cfg.train.run_dir, resume=resume, overwrite=overwrite, rank=int(os.environ.get("RANK", "0"))
    )
    try:
        if resume:
            ckpt.check_resume_fits(os.path.join(cfg.train.run_dir, "checkpoints"), cfg, vocab)
        return _setup(cfg, resume, vocab, lock, t_start)
    except BaseException:
        lock.release()
        raise


def pick_kernels_per_op(
    cfg: Config, engine, optimizer, scaler, device: torch.device, rank: int, world: int
) -> None:
    """`kernels.mode: auto` on a GPU: each fused op site gets the implementation measured fastest there
    (fastfilm/kernel_pick.py), timed inside a CUDA graph when graph mode will capture the step."""
    from fastfilm import kernel_pick
    from fastfilm.graphed import will_capture

    graphed = will_capture(cfg, engine, optimizer, scaler, device, world)
    kernel_pick.pick(
        engine.module, cfg.batch_size, cfg.kernels.candidates, autocast_dtype(cfg.deepspeed),
        graphed=graphed, rank=rank, run_dir=cfg.train.run_dir if rank == 0 else None,
    )  # fmt: skip
    # The run folder's config keeps `auto`: an evaluation elsewhere (a CPU) must not inherit the GPU's mode.
    cfg.kernels.mode = "auto"


def _setup(
    cfg: Config, resume: bool, vocab: dict, lock: ckpt.RunLock, t_start: float
) -> tuple[Run, TrainState]:
    from fastfilm.auto import PER_OP
    from fastfilm.auto import resolve as resolve_for_this_machine
    from fastfilm.data import loader_for

    rank, world, device = setup_distributed(cfg)
    choices = resolve_for_this_machine(cfg, device, vocab, rank)  # threads, precision / kernels auto; logged
    torch.manual_seed(cfg.train.seed)
    shard = dict(device=device, shard_id=rank, num_shards=world, vocab=vocab)
    train_loader = loader_for(cfg, cfg.data.train_split, train=True, **shard)
    val_loader = loader_for(cfg, cfg.data.val_split, train=False, **shard)
    engine, optimizer, scaler = build_engine(cfg, vocab, device, init=not resume)
    if any(c.what == "kernels" and c.value == PER_OP for c in choices):  # kernels.mode auto on a GPU
        pick_kernels_per_op(cfg, engine, optimizer, scaler, device, rank, world)
    if len(train_loader) < engine.gradient_accumulation_steps():
        raise ConfigError(
            f"{cfg.source}: deepspeed.train_micro_batch_size_per_gpu={cfg.batch_size} × "
            f"gradient_accumulation_steps={engine.gradient_accumulation_steps()} × {world} rank(s) is larger than "
            f"the {cfg.data.train_split} split ({train_loader.total} questions)"
        )
    state = TrainState()
    run = Run(
        cfg,
        engine,
        optimizer,
        scaler,
        autocast_dtype(cfg.deepspeed),
        device,
        rank,
        world,
        vocab,
        train_loader,
        val_loader,
        None,
        t_start,
        lock=lock,
    )
    if resume:
        state = restore(run)
    run.logger = ckpt.RunLogger(
        cfg.train.run_dir, cfg, enabled=run.is_main, tensorboard=cfg.train.tensorboard
    )
    if run.is_main:
        gas = engine.gradient_accumulation_steps()
        kernels_said = "per op (measured, above)" if cfg.kernels.mode == "auto" else cfg.kernels.mode
        print(
            f"fastfilm: {count_parameters(engine.module):,} parameters, kernels={kernels_said}, precision="
            f"{run.amp_dtype or torch.float32}, {world} rank(s) on {device.type}; global batch "
            f"{cfg.batch_size * gas * world} ({cfg.batch_size} × {gas} accumulation × {world} ranks), lr {cfg.lr:g}, "
            f"{len(train_loader) // gas} steps/epoch",
            flush=True,
        )
    return run, state


def restore(run: Run) -> TrainState:
    """The state of the run folder's `last` checkpoint, with engine, RNG and loss scaler restored from it."""
    loaded = ckpt.load(run.engine, run.ckpt_dir, "last")
    if loaded is None:
        raise ConfigError(f"--resume: no checkpoint in {run.ckpt_dir} (train without --resume to start anew)")
    state = TrainState.from_dict(loaded, os.path.join(run.ckpt_dir, "last", "trainer_state.json"))
    if run.scaler is not None and state.grad_scaler is not None:
        run.scaler.load_state_dict(state.grad_scaler)
    fmt = memory_format(run.cfg, run.device, run.engine.zero_optimization_stage())
    set_memory_format(run.engine, run.optimizer, fmt)  # a checkpoint of the other layout: states follow
    if run.is_main:
        print(f"resumed from {run.ckpt_dir}/last at step {state.step} (epoch {state.epoch})", flush=True)
        saved = ckpt.read_layout(ckpt.resolve_tag_dir(run.ckpt_dir, "last"))
        now = ckpt.layout_of(run.engine, run.cfg)
        total = run.train_loader.total
        lr = run.optimizer.param_groups[0]["lr"]  # restored: the next step's (a scheduler's, not cfg.lr)
        print(ckpt.resume_message(saved, now, lr, state.questions, total), flush=True)
    return state


# ------------------------------------------------------------------------------------------ one step
def grad_norm(engine) -> float | None:
    """The global L2 norm of the accumulated gradients, unscaled (fp16); None when ZeRO holds them elsewhere."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = float(torch.nn.utils.get_total_norm(grads))
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return norm / scaler.get_scale() if scaler is not None else norm


def train_step(
    engine,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    *,
    film_reg_weight: float = 0.0,
    gamma_baseline: float = 1.0,
    want_grad_norm: bool = False,
) -> StepResult:
    """One micro-batch as the trainer runs it: forward (autocast by the engine), float32 cross-entropy (+ the
    optional FiLM regulariser), `engine.backward`, `engine.step` — an optimizer step at the accumulation boundary."""
    # Safe without a sync, read in DALI 2.4's sources and binary: its dynamic executor hands out zero-copy DLPack
    # views whose host outputs (external_source) are pageable (cudaMemcpyAsync stages them before it returns), and
    # a freed pinned/GPU output goes to a graveyard thread that returns it to DALI only after cudaDeviceSynchronize
    # (torch's stream waited on DALI's ready event at `next()`); the torch loader's pinned batches are torch's own.
    images = batch["image"].to(device, non_blocking=True)
    questions = batch["question"].to(device, non_blocking=True)
    answers = batch["answer"].to(device, non_blocking=True)
    logits, (gammas, betas) = engine(images, questions, batch["length"], return_film=True)
    loss = F.cross_entropy(logits.float(), answers)
    if film_reg_weight > 0:
        loss = loss + film_reg_weight * film_regulariser(gammas, betas, gamma_baseline)
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    norm = grad_norm(engine) if boundary and want_grad_norm else None
    lr = float(engine.get_lr()[0]) if boundary else None  # before the step: DeepSpeed's scheduler steps in it
    engine.step()
    if boundary and want_grad_norm and norm is None:  # ZeRO: DeepSpeed computed it during the step
        norm = engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
    return StepResult(loss.detach(), logits.detach(), answers, boundary, norm, lr)


def engine_step(run: Run):
    """`train_step` with the run's engine and settings: `step(batch, want_grad_norm) -> StepResult`."""

    def step(batch: dict[str, torch.Tensor], want_grad_norm: bool = False) -> StepResult:
        return train_step(
            run.engine,
            batch,
            run.device,
            film_reg_weight=run.cfg.train.film_reg_weight,
            gamma_baseline=run.cfg.model.gamma_baseline,
            want_grad_norm=want_grad_norm,
        )

    return step


# ------------------------------------------------------------------------ agreement, evaluation, saving
def sync_bn_buffers(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks, in one collective (no host sync on a GPU).

    Each rank's statistics come from its own shard; parameters stay identical through the gradient all-reduce,
    buffers would not. Called after every optimizer step, so evaluation and checkpoints never depend on the rank,
    and a resumed run averages at the same steps as an uninterrupted one (bit-exact). The running update is
    linear, so this equals one momentum update with the ranks' mean batch statistics.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    bufs = [
        buf
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var)
    ]
    if not bufs:
        return
    flat = torch.cat([b.flatten() for b in bufs])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(v.view_as(b))


def agree(run: Run, state: TrainState) -> str | None:
    """The ranks' agreement (one collective, one host sync): raises TrainingStopped if any rank saw a non-finite
    loss since the last agreement; else the reason to stop now (a signal, the time budget) or None."""
    import torch.distributed as dist

    tc = run.cfg.train
    out_of_time = bool(tc.max_minutes) and run.minutes() >= tc.max_minutes
    bad = run.nonfinite if run.nonfinite is not None else torch.zeros((), device=run.device, dtype=torch.bool)
    flags = torch.stack(
        [
            bad.float(),
            torch.tensor(float(bool(run.signal)), device=run.device),
            torch.tensor(float(out_of_time), device=run.device),
        ]
    )
    if dist.is_initialized() and run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, signalled, out_of_time = (bool(v) for v in flags.tolist())
    run.nonfinite = None
    if bad_loss:
        raise TrainingStopped(
            f"non-finite loss in the {tc.sync_every} step(s) up to step {state.step} (epoch {state.epoch + 1}); "
            f"stopped without saving, the last good checkpoint in {run.ckpt_dir} is kept"
        )
    if signalled:
        return f"signal {run.signal[0] if run.signal else 'on another rank'}"
    return "train.max_minutes" if out_of_time else None


def evaluate(run: Run, state: TrainState) -> dict[str, Any]:
    """Val accuracy (every question once across ranks); logged."""
    result = evaluate_model(
        run.engine.module,
        run.val_loader,
        run.device,
        run.amp_dtype,
        run.vocab.get("question_family_names"),
        max_questions=run.cfg.data.max_val_questions,
        progress=run.cfg.train.progress,
    )
    run.engine.module.train()
    improved = result["accuracy"] > state.best_acc
    if improved:
        state.best_acc, state.best_step, state.evals_since_best = result["accuracy"], state.step, 0
    else:
        state.evals_since_best += 1
    record = {"val/acc": result["accuracy"], "val/best_acc": state.best_acc, "epoch": state.epoch}
    run.logger.log(state.step, {**record, "time/minutes": run.minutes()})
    if run.is_main:
        print(
            f"step {state.step}: val acc {result['accuracy']:.4f} (best {state.best_acc:.4f} at step "
            f"{state.best_step})",
            flush=True,
        )
    return {**result, "improved": improved}


def save(run: Run, state: TrainState, tag: str) -> None:
    """Checkpoint `tag` atomically (collective), after the ranks agree that no loss was non-finite."""
    if run.saved_at.get(tag) == state.step:
        return  # this tag already holds this step (e.g. the final epoch's evaluation just saved it)
    agree(run, state)
    if run.scaler is not None:
        state.grad_scaler = run.scaler.state_dict()
    ckpt.save(run.engine, run.ckpt_dir, tag, state.to_dict(), run.cfg, run.vocab)
    run.saved_at[tag] = state.step


def log_train(run: Run, state: TrainState, out: StepResult, questions: int, seconds: float) -> None:
    """One training record (loss, accuracy, lr, throughput, grad norm) from the step just taken."""
    acc = (out.logits.argmax(1) == out.answers).float().mean().item()
    run.logger.log(
        state.step,
        {
            "train/loss": out.loss.item(),
            "train/acc": acc,
            "train/lr": out.lr,  # the rate this step applied (param_groups already hold the next step's)
            "train/questions_per_s": questions / max(seconds, 1e-9),
            "train/grad_norm": out.grad_norm,
            "time/minutes": run.minutes(),
        },
    )


# ------------------------------------------------------------------------------------------- the loop
def early_stopping(tc) -> str:
    """The reason a run stopped early (`train.patience` evaluations without a better val accuracy)."""
    return f"early stopping (no better val accuracy in {tc.patience} evaluations)"


def stopped_already(tc, state: TrainState) -> str | None:
    """Why a run at `state` (a resumed one) takes no further step: it reached `train.max_steps`, or early stopping
    had ended it (a resume with a larger patience goes on); None if neither."""
    if tc.max_steps and state.step >= tc.max_steps:
        return "train.max_steps"
    if tc.patience and state.evals_since_best >= tc.patience:
        return early_stopping(tc)
    return None


def train_loop(run: Run, state: TrainState) -> str:
    """Optimizer steps until `train.epochs`, `max_steps`, the time budget, a signal or early stopping; returns
    why it stopped. Evaluates every `eval_every` steps (once per epoch by default), saving `last` (and `best`)."""
    from tqdm import tqdm

    tc, engine = run.cfg.train, run.engine
    gas = engine.gradient_accumulation_steps()
    per_micro = run.cfg.batch_size * run.world  # questions one micro-batch consumes over the ranks
    per_step = per_micro * gas
    engine.module.train()
    if (done := stopped_already(tc, state)) is not None:  # a resume of a run that had stopped: no step more
        return done
    from fastfilm.graphed import trainer_step

    step = trainer_step(run) or engine_step(run)  # train.cuda_graphs: graph mode's step, else the engine's
    while state.epoch < tc.epochs:
        if run.train_loader.bucket_by_length:  # the order depends on the global batch it was drawn for: a run
            if state.questions == 0 or not state.order_batch:  # resumed mid-epoch on another layout keeps it
                state.order_batch = run.train_loader.global_batch
            run.train_loader.bucket_batch = state.order_batch
        # From the position in the epoch's global order (any layout may have consumed it): whole optimizer
        # steps of this layout; the last questions that do not fill one are left out, as at every epoch's end.
        micro_left = run.train_loader.steps_from(state.questions) // gas * gas
        if micro_left == 0:
            state.epoch, state.questions = state.epoch + 1, 0
            continue
        bar = tqdm(
            total=state.questions // per_step + micro_left // gas,
            initial=state.questions // per_step,
            desc=f"epoch {state.epoch + 1}/{tc.epochs}",
            disable=not (run.is_main and tc.progress) or progress_off(),
            dynamic_ncols=True,
        )
        t_log, steps_since_log = time.time(), 0
        for batch in run.train_loader.epoch(state.epoch, start_question=state.questions):
            out = step(batch, want_grad_norm=(state.step + 1) % tc.log_every == 0)
            bad = ~torch.isfinite(out.loss)
            run.nonfinite = bad if run.nonfinite is None else run.nonfinite | bad
            state.questions += per_micro
            micro_left -= 1
            if not out.boundary:
                continue
            state.step += 1
            sync_bn_buffers(engine.module)
            steps_since_log += 1
            bar.update(1)
            end_of_epoch = micro_left <= 0
            if end_of_epoch:
                state.epoch, state.questions = state.epoch + 1, 0
            if state.step % tc.log_every == 0:
                log_train(run, state, out, steps_since_log * per_step, time.time() - t_log)
                t_log, steps_since_log = time.time(), 0
            stop = agree(run, state) if state.step % tc.sync_every == 0 else None
            if stop is None and tc.max_steps and state.step >= tc.max_steps:
                stop = "train.max_steps"
            # Evaluate every eval_every steps (by default at each epoch's end, also in an epoch resumed on another
            # layout), and once more when the time budget ends the run (its last minutes count); a signal or
            # max_steps does not evaluate, so a resumed run stays exact.
            due = state.step % tc.eval_every == 0 if tc.eval_every else end_of_epoch  # 0: at each epoch's end
            if due or stop == "train.max_minutes":
                result = evaluate(run, state)
                save(run, state, "last")
                if result["improved"]:
                    save(run, state, "best")
                if tc.patience and state.evals_since_best >= tc.patience:
                    return early_stopping(tc)
            if stop is not None:
                save(run, state, "last")
                return stop
            if end_of_epoch:
                break
        bar.close()
    save(run, state, "last")
    return "max epochs"


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run one training job as configured; returns a summary (why it stopped, steps, best val accuracy).

    A run folder that holds a run needs `resume` (continue it) or `overwrite` (delete it and start afresh)."""
    run, state = setup(cfg, resume, overwrite)
    old_handlers = {
        s: signal.signal(s, lambda n, f: run.signal.append(signal.Signals(n).name))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        reason = train_loop(run, state)
    except BaseException:
        run.lock.release()
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        run.logger.close()
    summary = {
        "reason": reason,
        "step": state.step,
        "epoch": state.epoch,
        "best_val_acc": state.best_acc,
        "best_step": state.best_step,
        "minutes": run.minutes(),
        "run_dir": cfg.train.run_dir,
    }
    if run.is_main:
        print(
            f"stopped: {reason}; " + json.dumps({k: v for k, v in summary.items() if k != "reason"}),
            flush=True,
        )
        ckpt.atomic_write_json(os.path.join(cfg.train.run_dir, "summary.json"), summary)
    run.lock.release()  # the run is over (a failed one released it above; a killed process loses it anyway)
    return summary


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments of the training script (the deepspeed launcher adds --local_rank)."""
    p = OneLineParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's `last` checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run that train.run_dir holds and start afresh"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Train from parsed command-line arguments; the exit status."""
    cfg = load_config(args.config, args.overrides, kernels=args.kernels)
    train(cfg, resume=args.resume, overwrite=getattr(args, "overwrite", False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python fastfilm/train.py` and `deepspeed fastfilm/train.py`."""
    args = parse_args(argv)
    return with_one_line_errors(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
