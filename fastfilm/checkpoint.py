"""Run folders: atomic DeepSpeed checkpoints (tags `last`, `best`), safetensors weights, metrics logs.

A checkpoint tag folder `RUN/checkpoints/TAG/` holds DeepSpeed's own files (`save_checkpoint`, for exact
resume: model, optimizer, scheduler) plus, written by fastfilm:
- `model.safetensors`: the weights (and BN buffers), what `eval`, `export` and `predict` read: no unpickling;
- `trainer_state.json`: step, epoch, loader position, best score; `rng.safetensors`: the RNG states;
- `config.json`, `vocab.json`; `manifest.json`: the sha256 of every file, checked before anything is loaded.
A tag is written under `TAG.partial` and renamed into place only when complete, so a kill or a full disk at any
point leaves the previous checkpoint of that tag loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or altered; the message names the folder and the file."""


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


def check_pickles(folder: str) -> None:
    """Refuse a checkpoint whose pickled files hold anything but tensors and plain containers.

    DeepSpeed's `load_checkpoint` unpickles with `weights_only=False`; every `.pt` file is first read with
    `torch.load(weights_only=True)`, which executes no code and fails on any other object.
    """
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            if not n.endswith((".pt", ".pth", ".bin")):
                continue
            p = os.path.join(root, n)
            try:
                torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all mean "do not unpickle"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
    ok = torch.tensor([1.0])
    try:
        engine.save_checkpoint(ckpt_dir, tag=partial_tag, save_latest=False)
        if rank == 0:
            atomic_save_safetensors(model_state(engine.module), os.path.join(partial, "model.safetensors"))
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            atomic_save_safetensors(rng, os.path.join(partial, "rng.safetensors"))
            atomic_write_json(os.path.join(partial, "trainer_state.json"), state)
            atomic_write_json(os.path.join(partial, "config.json"), cfg.to_dict())
            atomic_write_json(os.path.join(partial, "vocab.json"), vocab)
            write_manifest(partial)
    except OSError as e:
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
    _, _ = engine.load_checkpoint(ckpt_dir, tag=os.path.basename(folder), load_module_strict=True)
    rng = load_file(os.path.join(folder, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def find_checkpoint(path: str, tag: str = "best") -> str:
    """A run folder, a checkpoints folder or a tag folder → the verified tag folder to read weights from."""
    candidates = [path, os.path.join(path, "checkpoints")]
    for c in candidates:
        if os.path.isfile(os.path.join(c, MANIFEST)):
            verify(c)
            return c
        found = resolve_tag_dir(c, tag)
        if found is not None:
            verify(found)
            return found
    raise CheckpointError(
        f"{path}: no checkpoint with tag '{tag}' (expected RUN/checkpoints/{tag}/{MANIFEST})"
    )


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
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
