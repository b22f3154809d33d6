"""Train FiLM: `deepspeed fastfilm/train.py --config configs/clevr.json` (N ranks) or `fastfilm train` (one).

Read top to bottom: parse config → DALI loaders for this rank → model → `deepspeed.initialize` → loop (forward,
`engine.backward`, `engine.step`) → periodic evaluation → checkpoints (`last`, `best`) → early stopping.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make `fastfilm` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from fastfilm import checkpoint as ckpt
from fastfilm.config import Config, ConfigError, load_config
from fastfilm.evaluate import evaluate
from fastfilm.model import FiLMModel, count_parameters


class TrainingStopped(RuntimeError):
    """Training could not go on (a non-finite loss); the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------- set-up helpers
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_this_venvs_ninja() -> None:
    """Put this interpreter's `bin` folder first on PATH when it holds `ninja`.

    On a CPU, DeepSpeed JIT-builds a small C++ op on its first init, and torch runs whichever `ninja` PATH finds.
    With two ninja versions on a machine (the venv's, from pip, and the system's), each switch between them
    rebuilds the op (about 45 s on 2 cores): a launcher run and a plain run would take turns paying for it.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """Join the process group (gloo on CPU, nccl on GPU); works with and without the deepspeed launcher."""
    import deepspeed

    use_this_venvs_ninja()

    if "RANK" not in os.environ:  # plain `python fastfilm/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo",
        timeout=timedelta(seconds=cfg.train.dist_timeout_s),
    )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return rank, world, device


def preflight(cfg: Config) -> None:
    """Checks that need the launch environment or the disk, before any work starts (ConfigError / DataError):
    the batch keys against the number of ranks, and the data folders."""
    from fastfilm.data import load_vocab
    from fastfilm.data.prep import split_file

    cfg.resolve_batch(int(os.environ.get("WORLD_SIZE", "1")))
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
    load_vocab(dc.cache)  # a missing or edited vocabulary fails here, naming the file
    for key in ("train_split", "val_split"):
        path = split_file(dc.cache, getattr(dc, key))
        if not os.path.isfile(path):
            raise ConfigError(
                f"{cfg.source}: data.{key}: '{getattr(dc, key)}' is not prepared in {dc.cache} ({path} not found)"
            )


def build_optimizer(model: torch.nn.Module, ds: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay as the paper (apex's fused Adam when importable, else torch's)."""
    opt = ds.get("optimizer", {"type": "Adam", "params": {}})
    params = dict(opt.get("params", {}))
    decoupled = str(opt.get("type", "Adam")).lower() == "adamw"
    kwargs = {
        "lr": params.get("lr", 3e-4),
        "betas": tuple(params.get("betas", (0.9, 0.999))),
        "eps": params.get("eps", 1e-8),
        "weight_decay": params.get("weight_decay", 1e-5),
    }
    cuda = next(model.parameters()).is_cuda or torch.cuda.is_available()
    if cuda:
        try:
            from apex.optimizers import FusedAdam  # optional: see README

            return FusedAdam(model.parameters(), adam_w_mode=decoupled, **kwargs)
        except ImportError:
            pass
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(model.parameters(), fused=cuda, **kwargs)


def deepspeed_config(cfg: Config, world: int) -> tuple[dict[str, Any], torch.dtype | None]:
    """The DeepSpeed section as handed to `deepspeed.initialize`, and the autocast dtype of the forward.

    The optimizer is built here (see `build_optimizer`), so its section is removed. Mixed precision runs as
    DeepSpeed's `torch_autocast`: parameters, BN buffers and the optimizer stay float32, convs and GEMMs run in
    the low precision. `bf16` needs nothing more; `fp16` adds DeepSpeed's dynamic loss scaling (a
    `torch.amp.GradScaler`: steps whose gradients overflow are skipped and the scale backs off). DeepSpeed's own
    `bf16`/`fp16` modes would cast BN's affine parameters but not its float32 running stats, so they are not
    used.
    """
    ds = json.loads(json.dumps(cfg.deepspeed))
    ds.pop("optimizer", None)
    dtype = None
    if ds.get("bf16", {}).get("enabled"):
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if ds.get("fp16", {}).get("enabled"):  # stage 0 and dynamic scaling: checked by config.validate
        ds["fp16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    ac = ds.get("torch_autocast", {})
    if ac.get("enabled"):
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16}.get(
            str(ac.get("dtype", "bfloat16")).replace("torch.", "")
        )
    return ds, dtype


def configure_loss_scaler(engine, cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """The fp16 loss scaler DeepSpeed made (None without fp16), set from `deepspeed.fp16`'s
    `initial_scale_power` (default 16) and `loss_scale_window` (default 1000)."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is None:
        return None
    fp16 = cfg.deepspeed.get("fp16", {})
    new = torch.amp.GradScaler(
        device=device.type,
        init_scale=2.0 ** fp16.get("initial_scale_power", 16),
        growth_interval=int(fp16.get("loss_scale_window", 1000)),
    )
    engine.torch_autocast_z0_gradscaler = new
    return new


def film_regulariser(gammas: torch.Tensor, betas: torch.Tensor, baseline: float) -> torch.Tensor:
    """TADAM-style L2 pull of Δγ and β toward zero (beyond the paper; weight `train.film_reg_weight`)."""
    return (gammas.float() - baseline).pow(2).mean() + betas.float().pow(2).mean()


def sync_bn_buffers(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (each rank's come from its own shard of the data).

    Parameters stay identical through the gradient all-reduce; buffers do not, so evaluation and checkpoints
    would otherwise depend on the rank. Called before every evaluation and save.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(world)


def param_checksums(module: torch.nn.Module) -> dict[str, list[float]]:
    """Per rank, one checksum of the parameters and one of the buffers (equal on every rank when in step)."""
    import torch.distributed as dist

    def checksum(tensors) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64)
        for i, t in enumerate(tensors):
            if t.is_floating_point():
                v = t.detach().double().cpu().flatten()
                total += torch.stack([v.sum(), (v * (1 + (i % 7))).abs().sum()])
        return total

    local = torch.cat([checksum(module.parameters()), checksum(module.buffers())])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        gathered = [local]
    else:
        dev = next(module.parameters()).device
        gathered = [torch.zeros_like(local, device=dev) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.to(dev))
    return {
        "parameters": [float(g[0] + g[1]) for g in gathered],
        "buffers": [float(g[2] + g[3]) for g in gathered],
    }


# --------------------------------------------------------------------------------------------------- training
def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run one training job as configured; returns a summary (best val accuracy, steps, stop reason)."""
    import deepspeed
    import torch.distributed as dist

    from fastfilm.data import build_loader, load_vocab

    t_start = time.time()
    preflight(cfg)
    rank, world, device = setup_distributed(cfg)
    tc, dc = cfg.train, cfg.data
    is_main = rank == 0
    torch.manual_seed(tc.seed)

    # Data: this rank's shard of train (equal step counts on every rank) and of val (every question once).
    vocab = load_vocab(dc.cache)
    common = dict(
        image_source=dc.image_source,
        clevr_dir=dc.root,
        image_size=cfg.model.image_size,
        shard_id=rank,
        num_shards=world,
        seed=tc.seed,
        device_id=device.index if device.type == "cuda" else None,
        num_threads=dc.num_threads,
        prefetch=dc.prefetch,
    )
    train_loader = build_loader(
        dc.cache, dc.train_split, cfg.batch_size, shuffle=True, drop_last=True, **common
    )
    val_loader = build_loader(
        dc.cache, dc.val_split, cfg.batch_size, shuffle=False, drop_last=False, **common
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"{cfg.source}: deepspeed.train_micro_batch_size_per_gpu={cfg.batch_size} × {world} ranks is larger "
            f"than the {dc.train_split} split ({train_loader.num_questions} questions on this rank)"
        )

    # Model, optimizer, engine.
    model = FiLMModel(
        cfg.model,
        len(vocab["question_token_to_idx"]),
        len(vocab["answer_token_to_idx"]),
        kernels=cfg.kernels.mode,
    )
    if cfg.model.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    optimizer = build_optimizer(model, cfg.deepspeed)
    ds_config, amp_dtype = deepspeed_config(cfg, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    scaler = configure_loss_scaler(engine, cfg, device)  # fp16 only

    run_dir = tc.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    state = {"step": 0, "epoch": 0, "batch": 0, "best_acc": -1.0, "best_step": 0, "evals_since_best": 0}
    if resume:
        loaded = ckpt.load(engine, ckpt_dir, "last")
        if loaded is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (train without --resume to start anew)")
        state.update(loaded)
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        if is_main:
            print(
                f"resumed from {ckpt_dir}/last at step {state['step']} (epoch {state['epoch']})", flush=True
            )
    logger = ckpt.RunLogger(run_dir, cfg, enabled=is_main, tensorboard=tc.tensorboard)
    if is_main:
        n_params = count_parameters(model)
        print(
            f"fastfilm: {n_params:,} parameters, kernels={cfg.kernels.mode}, precision="
            f"{amp_dtype or torch.float32}, {world} rank(s) on {device.type}, "
            f"{len(train_loader)} steps/epoch × batch {cfg.batch_size}",
            flush=True,
        )

    # SIGTERM / SIGINT: finish the current step, save `last`, exit cleanly.
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def any_rank(*flags: torch.Tensor | bool) -> list[bool]:
        """Each flag OR-ed over the ranks: one collective and one host sync per call."""
        t = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def run_eval() -> dict[str, Any]:
        sync_bn_buffers(engine.module)
        result = evaluate(
            engine.module,
            val_loader,
            device,
            amp_dtype,
            vocab.get("question_family_names"),
            max_questions=dc.max_val_questions,
        )
        engine.module.train()
        return result

    saved_at: dict[str, int] = {}

    def save(tag: str) -> None:
        if saved_at.get(tag) == state["step"]:
            return  # this tag already holds this step (e.g. the final epoch's evaluation just saved it)
        saved_at[tag] = state["step"]
        if scaler is not None:  # DeepSpeed's checkpoint leaves the autocast loss scaler out
            state["grad_scaler"] = scaler.state_dict()
        sync_bn_buffers(engine.module)
        ckpt.save(engine, ckpt_dir, tag, state, cfg, vocab)

    reason = "max epochs"
    steps_per_epoch = len(train_loader)
    eval_every = tc.eval_every or steps_per_epoch
    engine.module.train()
    try:
        while state["epoch"] < tc.epochs:
            from tqdm import tqdm

            bar = tqdm(
                total=steps_per_epoch,
                initial=state["batch"],
                desc=f"epoch {state['epoch'] + 1}/{tc.epochs}",
                disable=not (is_main and tc.progress),
                dynamic_ncols=True,
            )
            t_log, q_log = time.time(), 0
            for batch in train_loader.epoch(state["epoch"], start_batch=state["batch"]):
                images = batch["image"].to(device, non_blocking=True)
                questions = batch["question"].to(device, non_blocking=True)
                answers = batch["answer"].to(device, non_blocking=True)
                logits, (gammas, betas) = engine(images, questions, batch["length"], return_film=True)
                loss = F.cross_entropy(logits.float(), answers)
                if tc.film_reg_weight > 0:
                    loss = loss + tc.film_reg_weight * film_regulariser(
                        gammas, betas, cfg.model.gamma_baseline
                    )
                engine.backward(loss)
                grad_norm = None
                if (state["step"] + 1) % tc.log_every == 0:
                    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                    grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                    if scaler is not None:  # fp16: the gradients are still multiplied by the loss scale
                        grad_norm /= scaler.get_scale()
                engine.step()
                # One collective per step: a non-finite loss anywhere stops every rank before anything is
                # saved (the update just applied lives only in memory), and a stop request is agreed on.
                out_of_time = tc.max_minutes and (time.time() - t_start) / 60 >= tc.max_minutes
                out_of_steps = tc.max_steps and state["step"] + 1 >= tc.max_steps
                bad_loss, stopping = any_rank(
                    ~torch.isfinite(loss.detach()), bool(stop["signal"] or out_of_time or out_of_steps)
                )
                if bad_loss:
                    raise TrainingStopped(
                        f"non-finite loss ({loss.item()}) at step {state['step']} (epoch {state['epoch'] + 1}); "
                        f"stopped without saving, the last good checkpoint in {ckpt_dir} is kept"
                    )
                state["step"] += 1
                state["batch"] += 1
                q_log += answers.numel() * world
                bar.update(1)

                if state["step"] % tc.log_every == 0:
                    acc = (logits.argmax(1) == answers).float().mean().item()
                    qps = q_log / max(time.time() - t_log, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", qps=f"{qps:,.0f}")
                    logger.log(
                        state["step"],
                        {
                            "train/loss": loss.item(),
                            "train/acc": acc,
                            "train/lr": optimizer.param_groups[0]["lr"],
                            "train/questions_per_s": qps,
                            "train/grad_norm": grad_norm,
                            "time/minutes": (time.time() - t_start) / 60,
                        },
                    )
                    t_log, q_log = time.time(), 0

                end_of_epoch = state["batch"] >= steps_per_epoch
                if end_of_epoch:
                    state["epoch"] += 1
                    state["batch"] = 0
                # Evaluate every eval_every steps (one epoch by default), and once more when the time budget
                # (train.max_minutes) ends the run, so that its last minutes count.
                if state["step"] % eval_every == 0 or (stopping and out_of_time and not stop["signal"]):
                    result = run_eval()
                    improved = result["accuracy"] > state["best_acc"]
                    if improved:
                        state.update(best_acc=result["accuracy"], best_step=state["step"], evals_since_best=0)
                    else:
                        state["evals_since_best"] += 1
                    logger.log(
                        state["step"],
                        {
                            "val/acc": result["accuracy"],
                            "val/best_acc": state["best_acc"],
                            "epoch": state["epoch"],
                            "time/minutes": (time.time() - t_start) / 60,
                        },
                    )
                    if is_main:
                        bar.write(
                            f"step {state['step']}: val acc {result['accuracy']:.4f} "
                            f"(best {state['best_acc']:.4f} at step {state['best_step']})"
                        )
                    save("last")
                    if improved:
                        save("best")
                    if tc.patience and state["evals_since_best"] >= tc.patience:
                        reason = f"early stopping (no better val accuracy in {tc.patience} evaluations)"
                        break
                if stopping:
                    reason = (
                        f"signal {stop['signal']}"
                        if stop["signal"]
                        else ("train.max_minutes" if out_of_time else "train.max_steps")
                    )
                    save("last")
                    break
                if end_of_epoch:
                    break
            bar.close()
            if reason != "max epochs":
                break
        else:
            save("last")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        logger.close()

    summary = {
        "reason": reason,
        "rank_param_checksums": param_checksums(engine.module),
        "step": state["step"],
        "epoch": state["epoch"],
        "best_val_acc": state["best_acc"],
        "best_step": state["best_step"],
        "minutes": (time.time() - t_start) / 60,
        "run_dir": run_dir,
    }
    if is_main:
        print(
            f"stopped: {reason}; " + json.dumps({k: v for k, v in summary.items() if k != "reason"}),
            flush=True,
        )
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments of the training script (the deepspeed launcher adds --local_rank)."""
    from fastfilm.cli import _add_config_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's `last` checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Train from parsed command-line arguments; the exit status."""
    cfg = load_config(args.config, args.overrides, kernels=args.kernels)
    try:
        train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"fastfilm: training stopped: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python fastfilm/train.py` and `deepspeed fastfilm/train.py`."""
    from fastfilm.cli import with_one_line_errors

    args = parse_args(argv)
    return with_one_line_errors(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
