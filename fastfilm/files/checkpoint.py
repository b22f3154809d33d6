"""Run folders: atomic DeepSpeed checkpoints (tags `last`, `best`), safetensors weights, metrics logs.

A checkpoint tag folder `RUN/checkpoints/TAG/` holds DeepSpeed's own files (`save_checkpoint`, for exact
resume: model, optimizer, scheduler) plus, written by fastfilm:
- `model.safetensors`: the weights (and BN buffers), what `eval`, `export` and `predict` read: no unpickling;
- `trainer_state.json`: step, epoch, loader position, best score; `rng.safetensors`: the RNG states;
- `config.json`, `vocab.json`; `manifest.json`: the sha256 of every file, checked before anything is loaded.
- `layout.json`: the ranks, micro-batch and ZeRO stage that wrote it (what a resume may change).
A tag is written under `TAG.partial` and renamed into place only when complete (every tensor of the model's
state-dict present with the model's shape), so a kill or a full disk at any point leaves the previous checkpoint
of that tag loadable.

A run folder is owned: `claim_run_dir` holds `RUN/.lock` (an `flock`, released by the kernel when the process
ends, even by SIGKILL) for a run's life, and refuses a new run into a folder that holds one unless it resumes
or overwrites it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastfilm.core.collectives import collective_device
from fastfilm.core.errors import FastfilmError

MANIFEST = "manifest.json"


class CheckpointError(FastfilmError, RuntimeError):
    """A checkpoint is missing, incomplete or altered; the message names the folder and the file."""

    label = "checkpoint error"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON to `path` through a temp file and a rename (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None
) -> None:
    """Write a safetensors file through a temp file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_manifest(folder: str) -> None:
    """Record the sha256 of every file in `folder` (the last file written to a complete checkpoint)."""
    files = {}
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            if rel != MANIFEST:
                files[rel] = _sha256(p)
    atomic_write_json(os.path.join(folder, MANIFEST), {"files": files})


def verify(folder: str) -> None:
    """Refuse a checkpoint folder whose files are missing, extra or differ from its manifest."""
    mpath = os.path.join(folder, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{folder}: no {MANIFEST}: not a complete fastfilm checkpoint")
    try:
        with open(mpath, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    present = set()
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != MANIFEST:
                present.add(rel)
    extra = present - set(files)
    if extra:
        raise CheckpointError(f"{folder}: files not in the manifest: {', '.join(sorted(extra))} (refused)")
    for rel, digest in files.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{p}: sha256 differs from the manifest: altered or corrupt (refused)")


# The DeepSpeed classes its ZeRO stage 1/2 optimizer-state files (`zero_pp_rank_*_optim_states.pt`) pickle
# besides tensors and containers: plain data holders (a scale and a flag; two ints; an IntEnum) whose loading
# runs no code of the file's choosing. Allowed only in those files, and only for the DeepSpeed versions checked:
# read from 0.19.8's files; 0.17.0's stage_1_and_2.state_dict pickles the same three classes. Another version's
# classes may hold other things: its files are refused until it is checked and the range below widened.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
DEEPSPEED_VERSIONS = ((0, 17), (0, 20))  # [0.17, 0.20): setup.py should pin `deepspeed>=0.17,<0.20`
ZERO_OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")


def _deepspeed_version() -> tuple[int, int] | None:
    try:
        import deepspeed
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)", getattr(deepspeed, "__version__", ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes a ZeRO optimizer-state file may hold, or [] for a DeepSpeed outside the pinned range."""
    import importlib

    version = _deepspeed_version()
    if version is None or not (DEEPSPEED_VERSIONS[0] <= version < DEEPSPEED_VERSIONS[1]):
        return []
    classes = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


def check_pickles(folder: str) -> None:
    """Refuse a checkpoint whose pickled files hold anything but tensors, plain containers and, in DeepSpeed's
    ZeRO optimizer-state files, the DeepSpeed data classes in `DEEPSPEED_SAFE_GLOBALS`.

    DeepSpeed's `load_checkpoint` unpickles with `weights_only=False`; every `.pt` file is first read with
    `torch.load(weights_only=True)`, which executes no code and fails on any other object.
    """
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            if not n.endswith((".pt", ".pth", ".bin")):
                continue
            p = os.path.join(root, n)
            allowed = deepspeed_safe_globals() if ZERO_OPTIM_STATES.match(n) else []
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all mean "do not unpickle"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                if found:
                    first = f"it holds {found.group(1)}"
                    v = _deepspeed_version()
                    if (
                        found.group(1) in DEEPSPEED_SAFE_GLOBALS
                        and not allowed
                        and ZERO_OPTIM_STATES.match(n)
                    ):
                        lo, hi = DEEPSPEED_VERSIONS
                        first += (
                            f", allowed only with DeepSpeed >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} "
                            f"(this is {f'{v[0]}.{v[1]}' if v else 'not installed'})"
                        )
                raise CheckpointError(
                    f"{p}: refused: not loadable with weights_only=True ({first}); fastfilm never unpickles "
                    "objects other than tensors"
                ) from None


def resolve_tag_dir(ckpt_dir: str, tag: str) -> str | None:
    """The folder of `tag` in `ckpt_dir`; after a kill between the two renames, the kept previous one."""
    for name in (tag, f"{tag}.old"):
        p = os.path.join(ckpt_dir, name)
        if os.path.isfile(os.path.join(p, MANIFEST)):
            return p
    return None


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state-dict (parameters and buffers) as plain CPU tensors."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor of the module's state-dict with the model's shape for it (a ZeRO-3-partitioned parameter's
    whole shape, `ds_shape`, not its local partition's)."""
    return {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in module.state_dict(keep_vars=True).items()}


def check_complete(path: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a weights file that is not the whole model: every tensor of `expected`, with its shape, no other."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # unreadable header, truncated file
        raise CheckpointError(f"{path}: unreadable weights file ({e})") from None
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [
        f"{k} {list(found[k])} (model: {list(v)})"
        for k, v in expected.items()
        if k in found and found[k] != v
    ]
    problems = []
    for what, items in (("missing", missing), ("not in the model", extra), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{path}: not the whole model ({'; '.join(problems)})")


def _zero_stage(engine, cfg) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    if callable(stage):
        return int(stage())
    return int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))


def layout_of(engine, cfg) -> dict[str, int]:
    """How this run is laid out over ranks: what a checkpoint records and a resume may change (`layout.json`)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    accum = int(cfg.deepspeed.get("gradient_accumulation_steps", 1))
    return {
        "world_size": world,
        "micro_batch": int(cfg.batch_size),
        "gradient_accumulation_steps": accum,
        "global_batch": int(cfg.batch_size) * accum * world,
        "zero_stage": _zero_stage(engine, cfg),
    }


def read_layout(folder: str) -> dict[str, int] | None:
    """The layout a checkpoint folder was written with (None for checkpoints older than `layout.json`)."""
    path = os.path.join(folder, "layout.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(engine, ckpt_dir: str, tag: str, state: dict, cfg, vocab: dict) -> str:
    """Save an exact-resume checkpoint under `ckpt_dir/tag` atomically (collective: call on every rank)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    partial_tag = f"{tag}.partial"
    partial = os.path.join(ckpt_dir, partial_tag)
    final = os.path.join(ckpt_dir, tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    ok = torch.tensor([1.0], device=collective_device())  # all ranks wrote their part (NCCL: on the GPU)
    try:
        engine.save_checkpoint(ckpt_dir, tag=partial_tag, save_latest=False)
        if rank == 0:
            weights = os.path.join(partial, "model.safetensors")
            atomic_save_safetensors(model_state(engine.module), weights)
            check_complete(weights, expected_shapes(engine.module))
            atomic_write_json(os.path.join(partial, "layout.json"), layout_of(engine, cfg))
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            atomic_save_safetensors(rng, os.path.join(partial, "rng.safetensors"))
            atomic_write_json(os.path.join(partial, "trainer_state.json"), state)
            atomic_write_json(os.path.join(partial, "config.json"), cfg.to_dict())
            atomic_write_json(os.path.join(partial, "vocab.json"), vocab)
            write_manifest(partial)
    except (OSError, CheckpointError) as e:  # on one rank: the others must still reach the all-reduce
        ok[0] = 0.0
        err = e
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 0:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        where = resolve_tag_dir(ckpt_dir, tag)
        raise CheckpointError(
            f"could not write checkpoint {final}: {locals().get('err', 'failed on another rank')}; "
            f"the previous one is kept ({where or 'none'})"
        )
    if rank == 0:
        old = os.path.join(ckpt_dir, f"{tag}.old")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def load(engine, ckpt_dir: str, tag: str) -> dict | None:
    """Restore engine (model, optimizer, scheduler) and RNG from `ckpt_dir/tag`; the trainer state, or None."""
    folder = resolve_tag_dir(ckpt_dir, tag)
    if folder is None:
        return None
    verify(folder)
    check_pickles(folder)
    check_layout(folder, engine)
    _, _ = engine.load_checkpoint(ckpt_dir, tag=os.path.basename(folder), load_module_strict=True)
    rng = load_file(os.path.join(folder, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def check_resume_fits(ckpt_dir: str, cfg, vocab: dict) -> None:
    """`--resume`: refuse, before any work, a config whose `model` section or a cache whose vocabulary is not the
    one `last` was trained with (its weights would not load, or its word ids would mean other words)."""
    folder = resolve_tag_dir(ckpt_dir, "last")
    if folder is None:
        return  # the trainer says that there is nothing to resume
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)["model"]
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            saved_hash = json.load(f).get("hash")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # verify() names what is wrong with the checkpoint when it is loaded
    now = cfg.to_dict()["model"]
    diffs = [k for k in now if k in saved and saved[k] != now[k] and k != "memory_format"]  # layout only
    fix = f"resume with the run's own {folder}/config.json, or start afresh with --overwrite or another train.run_dir"
    if diffs:
        k = diffs[0]
        more = f" (and {len(diffs) - 1} other model key(s))" if len(diffs) > 1 else ""
        raise CheckpointError(
            f"--resume: {folder} was trained with model.{k}={saved[k]!r}, {cfg.source} gives {now[k]!r}{more}; {fix}"
        )
    if saved_hash is not None and saved_hash != vocab.get("hash"):
        raise CheckpointError(
            f"--resume: {folder} was trained with vocabulary {str(saved_hash)[:12]}…, data.cache "
            f"{cfg.data.cache} has {str(vocab.get('hash'))[:12]}… (another vocabulary); {fix}"
        )


SUPPORTED_ZERO_STAGES = (0, 1, 2)
SUPPORTED_ZERO_STAGES = (0, 1, 2)


def check_zero_stage(cfg) -> None:
    """Refuse (ConfigError, before any work) a ZeRO stage whose checkpoints could not hold the whole model.

    ZeRO-3 keeps on each rank only its partition of every parameter (the module's state-dict outside a gather
    holds partitions); fastfilm's checkpoints, evaluation and export read whole parameters, so stage 3 is refused
    rather than gathered. For a model of this size (59 M parameters) what ZeRO saves is the optimizer state
    (stage 1) and the gradients (stage 2); the parameters themselves are 0.24 GB in float32.
    """
    from fastfilm.core.config import ConfigError

    zero = cfg.deepspeed.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if stage in SUPPORTED_ZERO_STAGES and not isinstance(stage, bool):
        return
    if stage == 3:
        raise ConfigError(
            f"{cfg.source}: deepspeed.zero_optimization.stage=3 is not supported: ZeRO-3 partitions the "
            "parameters themselves, and fastfilm's checkpoints, evaluation and export need whole ones; use "
            "stage 1 or 2 (float32 or bf16), which partition the optimizer state (and the gradients)"
        )
    raise ConfigError(f"{cfg.source}: deepspeed.zero_optimization.stage must be 0, 1 or 2, got {stage!r}")


def check_layout(folder: str, engine) -> None:
    """Refuse a resume DeepSpeed cannot do exactly: another ZeRO stage, or under ZeRO another number of ranks
    (its optimizer state is split in one partition per rank). Ranks and micro-batch may change at stage 0."""
    import torch.distributed as dist

    saved = read_layout(folder)
    if saved is None:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    was, ranks = saved["zero_stage"], saved["world_size"]
    if was != stage:
        raise CheckpointError(
            f"{folder}: written with deepspeed.zero_optimization.stage={was}, this run has stage={stage}; "
            f"resume with --set deepspeed.zero_optimization.stage={was}"
        )
    if stage > 0 and ranks != world:
        raise CheckpointError(
            f"{folder}: written by {ranks} rank(s) under ZeRO stage {stage}, whose optimizer state is split in "
            f"{ranks} partition(s); resume it on {ranks} rank(s) (the micro-batch may change)"
        )


def resume_message(saved: dict | None, now: dict, lr: float, position: int, total: int) -> str:
    """One line for a resume: the ranks × micro-batch (global batch) before and now, the learning rate, and
    where the epoch continues (`position` questions of its `total` consumed; the rest split in optimizer steps of
    one global batch each, micro-batch × accumulation × ranks)."""
    steps, left_out = divmod(total - position, now["global_batch"])
    was = (
        f"{saved['world_size']} rank(s) × micro-batch {saved['micro_batch']} (global batch {saved['global_batch']})"
        if saved
        else "unknown layout"
    )
    line = (
        f"resume: {was} → {now['world_size']} rank(s) × micro-batch {now['micro_batch']}"
        f" × accumulation {now['gradient_accumulation_steps']} = global batch {now['global_batch']}, lr {lr:g}"
        f"{' (not rescaled with the batch)' if saved and saved['global_batch'] != now['global_batch'] else ''}; "
        f"the epoch continues after {position} of its {total} questions: {steps} step(s)"
    )
    if left_out:
        line += f", its last {left_out} question(s) (less than one step) left out as at every epoch's end"
    return line


def find_checkpoint(path: str, tag: str = "best", tag_option: str | None = None) -> str:
    """A run folder, a checkpoints folder or a tag folder → the verified tag folder to read weights from.
    `tag_option` (e.g. "--tag") is the option that picks the tag, named when `tag` is missing."""
    candidates = [path, os.path.join(path, "checkpoints")]
    for c in candidates:
        if os.path.isfile(os.path.join(c, MANIFEST)):
            verify(c)
            return c
        found = resolve_tag_dir(c, tag)
        if found is not None:
            verify(found)
            return found
    ckpt_dir = os.path.join(path, "checkpoints")
    tags = sorted(
        t
        for t in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
        if "." not in t and resolve_tag_dir(ckpt_dir, t) is not None
    )
    has = ""
    if tags:
        use = f"use {tag_option} {tags[0]}" if tag_option else f"give {os.path.join(ckpt_dir, tags[0])}"
        has = f"; it has {', '.join(tags)}: {use}"
    raise CheckpointError(
        f"{path}: no checkpoint with tag '{tag}' (expected RUN/checkpoints/{tag}/{MANIFEST}){has}"
    )


RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "config.json", "tensorboard")


def _holds_run(run_dir: str) -> str | None:
    """What shows that `run_dir` holds a run (a checkpoint, metrics or a summary), or None."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    for tag in ("last", "best"):
        folder = resolve_tag_dir(ckpt_dir, tag)
        if folder is not None:
            try:
                with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
                    step = json.load(f).get("step")
            except (OSError, ValueError, AttributeError):
                step = None
            return f"checkpoint {os.path.basename(folder)}" + (f" at step {step}" if step is not None else "")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        return "a checkpoints/ folder"
    for name in ("metrics.jsonl", "summary.json"):
        if os.path.isfile(os.path.join(run_dir, name)):
            return name
    return None


class RunLock:
    """Ownership of a run folder for one run's life: an exclusive `flock` on `RUN/.lock` (held open; the kernel
    drops it when the process ends, however it ends). Use as a context manager or call `release()`."""

    def __init__(self, run_dir: str, fd: int | None):
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(run_dir: str, *, resume: bool = False, overwrite: bool = False, rank: int = 0) -> RunLock:
    """Own `run_dir` for this run (rank 0 takes the lock; other ranks get a no-op `RunLock`).

    Refused (`CheckpointError`, one line): a folder another live run holds; a new run (neither `resume` nor
    `overwrite`) into a folder that holds a run. With `overwrite`, the old run's files (`RUN_FILES`) are deleted
    once the lock is held; nothing else in the folder is touched.
    """
    if resume and overwrite:
        raise CheckpointError(f"{run_dir}: --resume and --overwrite exclude each other: pick one")
    if rank != 0:
        return RunLock(run_dir, None)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise CheckpointError(
            f"{run_dir}: in use by a live run ({holder} holds {path}); wait for it to end, or give this run "
            "another train.run_dir"
        ) from None
    lock = RunLock(run_dir, fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        held = _holds_run(run_dir)
        if held and not resume:
            if not overwrite:
                raise CheckpointError(
                    f"{run_dir}: holds a run ({held}); continue it with --resume, or start afresh with another "
                    "train.run_dir or with --overwrite (deletes that run)"
                )
            for name in RUN_FILES:
                p = os.path.join(run_dir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
    except BaseException:
        lock.release()
        raise
    return lock


def _json_number(v: Any) -> Any:
    """A metric as strict JSON: a non-finite float (a NaN loss, an overflowed grad norm) as "nan", "inf", "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class RunLogger:
    """The run folder's resolved config.json, metrics.jsonl and TensorBoard scalars (rank 0 only)."""

    def __init__(self, run_dir: str, cfg, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self.tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and the TensorBoard scalars."""
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        record = {"step": step, **{k: _json_number(v) for k, v in clean.items()}}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: jq and JSON.parse read it
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
