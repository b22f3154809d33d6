"""Start training from trained weights (`train.init_from`) and train only part of the model (`train.trainable`).

`train.init_from` names a run folder (its `best` checkpoint), a checkpoint tag folder, an exported model
(`fastfilm export` / `fastfilm import-original`) or a checkpoint file of the original FiLM code. The weights load
strictly into the model the run's config builds, with one exception, the one the original's CLEVR-Humans recipe
needs: when the run's question vocabulary *extends* the source's (the source's words keep their ids and new
words come after them, as `fastfilm prep --vocab-from SRC --expand-vocab` makes it), the word embedding grows by
one row per new word, drawn from N(0, 0.01²) as the original's `vr/embedding.py` `expand_embedding_vocab`.
A vocabulary that is not such an extension, or a different answer vocabulary, is an error that says so.

`train.trainable`:
- `all` (default): everything trains.
- `generator`: the FiLMed network (visual stem, ResBlocks, classifier) is frozen, only the FiLM generator trains
  (the original's `--train_execution_engine 0`, used for CLEVR-Humans).
- `network`: the generator is frozen, the FiLMed network trains.

Frozen parameters get `requires_grad=False`: they get no gradient, DeepSpeed skips them in its gradient
reduction, the optimizer never changes them (weight decay included), so they stay bit-identical.

BatchNorm running statistics are buffers, not parameters. `train.frozen_mode` decides what the frozen part does:
- `train` (default, as film_humans.sh: `--set_execution_engine_eval 0`): the frozen network stays in training
  mode, so its BatchNorm layers normalise with each batch's statistics and keep updating their running
  mean/variance from the new data (the weights stay fixed, the statistics adapt; dropout, if any, stays on);
- `eval` (the original's `--set_execution_engine_eval 1`): the frozen part runs in eval mode during training, so
  BatchNorm normalises with the stored running statistics and never changes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from fastfilm.files.checkpoint import CheckpointError

TRAINABLE = ("all", "generator", "network")
FROZEN_MODES = ("train", "eval")
EMBEDDING_KEY = "generator.encoder_embed.weight"
NEW_ROW_STD = 0.01  # the original's expand_embedding_vocab default


def load_source(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(fastfilm state dict, vocab, what it is) for a run folder, tag folder, exported model or original file."""
    from safetensors.torch import load_file

    if os.path.isfile(path):
        from fastfilm.files.original import load_original

        model, _, vocab, _ = load_original(path)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, vocab, "original checkpoint"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder (train.init_from)")
    folder, kind = path, "exported model"
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from fastfilm.files.checkpoint import find_checkpoint

        folder, kind = find_checkpoint(path, "best"), "run"
    elif os.path.isfile(os.path.join(path, "manifest.json")):
        from fastfilm.files.checkpoint import verify

        verify(path)
    for name in ("model.safetensors", "vocab.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(
                f"{folder}: missing {name} (train.init_from needs weights and a vocabulary)"
            )
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    return load_file(os.path.join(folder, "model.safetensors")), vocab, f"{kind} {folder}"


def check_vocab_extends(old: Mapping[str, int], new: Mapping[str, int], source: str) -> list[str]:
    """The words `new` appends to `old` (in id order); CheckpointError when `new` is not `old` plus appended words."""
    changed = [w for w, i in old.items() if new.get(w) != i]
    if changed or len(new) < len(old):
        examples = ", ".join(f"{w!r} ({old[w]} → {new.get(w, 'absent')})" for w in changed[:3])
        raise CheckpointError(
            f"{source}: the run's question vocabulary is not the source's vocabulary followed by new words "
            f"({len(changed)} of its {len(old)} words have another id or are missing, e.g. {examples}); "
            "prepare the data with `fastfilm prep --vocab-from SOURCE [--expand-vocab]`"
        )
    added = sorted((i, w) for w, i in new.items() if w not in old)
    if [i for i, _ in added] != list(range(len(old), len(new))):
        raise CheckpointError(f"{source}: the new words' ids are not {len(old)}..{len(new) - 1}")
    return [w for _, w in added]


def grow_embedding(weight: torch.Tensor, rows: int, std: float = NEW_ROW_STD) -> torch.Tensor:
    """`weight` [V, D] with rows appended up to `rows`, the new ones ~ N(0, std²) (the original's init)."""
    old, dim = weight.shape
    new = weight.new_empty(rows, dim).normal_().mul_(std)
    new[:old].copy_(weight)
    return new


def init_from(model: torch.nn.Module, source: str, vocab: Mapping[str, Any]) -> dict[str, Any]:
    """Load `source`'s weights into `model` (built for `vocab`), growing the word embedding when the vocabulary
    extends the source's; returns what was done. Raises CheckpointError when they do not fit."""
    state, src_vocab, kind = load_source(source)
    where = f"train.init_from={source}"
    if dict(src_vocab.get("answer_token_to_idx", {})) != dict(vocab["answer_token_to_idx"]):
        raise CheckpointError(
            f"{where}: the answer vocabulary differs from the source's ({len(src_vocab.get('answer_token_to_idx', {}))} "
            f"vs {len(vocab['answer_token_to_idx'])} answers, or other ids): the classifier cannot be reused"
        )
    added = check_vocab_extends(src_vocab["question_token_to_idx"], vocab["question_token_to_idx"], where)
    if added and EMBEDDING_KEY in state:
        state[EMBEDDING_KEY] = grow_embedding(state[EMBEDDING_KEY], len(vocab["question_token_to_idx"]))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: the source's weights do not fit this run's model (check the model section against the "
            f"source's config): missing {', '.join(missing[:4]) or 'none'}; unexpected "
            f"{', '.join(unexpected[:4]) or 'none'}; shapes {'; '.join(wrong[:3]) or 'ok'}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return {"source": kind, "new_words": added, "tensors": len(state)}


def _set_eval(module: torch.nn.Module, _inputs: Any) -> None:
    if module.training:
        module.eval()


def apply_trainable(model: torch.nn.Module, trainable: str = "all", frozen_mode: str = "train") -> int:
    """Freeze the part of `model` that `trainable` leaves out (requires_grad False); with `frozen_mode="eval"`
    that part runs in eval mode even while the model trains. Returns the number of frozen parameters."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if frozen_mode not in FROZEN_MODES:
        raise ValueError(f"frozen_mode must be one of {', '.join(FROZEN_MODES)}, got {frozen_mode!r}")
    if trainable == "all":
        return 0
    frozen = model.net if trainable == "generator" else model.generator
    n = 0
    for p in frozen.parameters():
        p.requires_grad_(False)
        n += p.numel()
    if frozen_mode == "eval":
        frozen.register_forward_pre_hook(
            _set_eval
        )  # model.train() turns it back on; each forward undoes that
    return n


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should get (those left trainable by `apply_trainable`)."""
    return [p for p in model.parameters() if p.requires_grad]


def prepare_model(
    model: torch.nn.Module, train_cfg: Any, vocab: Mapping[str, Any], load_weights: bool = True
) -> dict[str, Any]:
    """The trainer's one call: `init_from` (when `train.init_from` is set and `load_weights`: a resumed run
    takes its weights from its checkpoint, so the source may be gone), then `apply_trainable`."""
    summary: dict[str, Any] = {}
    if getattr(train_cfg, "init_from", "") and load_weights:
        summary = init_from(model, train_cfg.init_from, vocab)
    summary["frozen_parameters"] = apply_trainable(
        model, getattr(train_cfg, "trainable", "all"), getattr(train_cfg, "frozen_mode", "train")
    )
    return summary


def describe(summary: dict[str, Any], train_cfg: Any) -> str:
    """One line saying what `prepare_model` did ("" when it did nothing)."""
    parts = []
    if summary.get("source"):
        words = summary.get("new_words", [])
        grown = f", word embedding grown by {len(words)} row(s) ~ N(0, {NEW_ROW_STD}²)" if words else ""
        parts.append(f"weights from {summary['source']}{grown}")
    if summary.get("frozen_parameters"):
        part = "FiLMed network" if train_cfg.trainable == "generator" else "generator"
        parts.append(
            f"{part} frozen ({summary['frozen_parameters']:,} parameters, {train_cfg.frozen_mode} mode while training)"
        )
    return "init: " + "; ".join(parts) if parts else ""
