"""Checkpoints of the original FiLM code (`ethanjperez/film`): read them safely, map them, import them.

`scripts/train_model.py` of the original saves, with `torch.save`, one dict: `args` (its command line, a plain
dict), `program_generator_kwargs` and `program_generator_state` (FiLMGen), `execution_engine_kwargs` and
`execution_engine_state` (FiLMedNet), `vocab` and its training statistics (`best_val_acc`, `model_t`, ...).
Files from 2017 are in torch's legacy (non-zip) format. Both formats are read with
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers and runs no pickled code; a file
that needs anything else (a pickled class, a function) is refused with one line.

`fastfilm import-original CKPT --out DIR` maps every model argument of the two kwargs dicts onto fastfilm's
`model` config (an argument fastfilm has no switch for is an error that names it), the vocabulary onto
fastfilm's `vocab.json` (ids unchanged: both codes build vocabularies the same way), the weights through
`fastfilm.model.from_original_state_dict`, and writes an exported-model folder (`model.safetensors`,
`config.json`, `vocab.json`, `manifest.json`, plus `original.json` saying where it came from) that `predict`,
`eval`, `analyze` and `train.init_from` read.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fastfilm.core.config import CONDITION_METHODS, Config, ConfigError, config_from_dict
from fastfilm.files.checkpoint import CheckpointError

ORIGINAL_KEYS = (
    "program_generator_kwargs",
    "program_generator_state",
    "execution_engine_kwargs",
    "execution_engine_state",
    "vocab",
)

# The original's renamed argument values (`vr/utils.py` `arg_value_updates`), applied as it applies them.
_VALUE_UPDATES = {
    "condition_method": {
        "block-input-fac": "block-input-film",
        "block-output-fac": "block-output-film",
        "cbn": "bn-film",
        "conv-fac": "conv-film",
        "relu-fac": "relu-film",
    },
}
# Arguments that only change printing or debugging in the original, never the computation.
_NO_EFFECT = {"debug_every", "print_verbose_every", "verbose"}


def read_original_checkpoint(path: str) -> dict[str, Any]:
    """The dict an original `scripts/train_model.py` saved (legacy or zip format), read without unpickling code.

    Raises CheckpointError (one line, naming the file) for a missing file, a file that needs anything beyond
    tensors and plain containers, or a dict without the original's keys.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (expected a checkpoint of the original FiLM code)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all mean "refuse"
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: not loadable with weights_only=True ({first}); fastfilm never unpickles "
            "objects other than tensors and plain containers"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected the original's checkpoint dict, found {type(ckpt).__name__}")
    missing = [k for k in ORIGINAL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a checkpoint of the original FiLM code (missing {', '.join(missing)}); "
            "fastfilm run folders and exported models are read directly"
        )
    for k in ("program_generator_state", "execution_engine_state"):
        if not isinstance(ckpt[k], Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt[k].values()):
            raise CheckpointError(f"{path}: '{k}' is not a state dict of tensors")
    return ckpt


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ConfigError(f"{where}: expected 0/1 or true/false, got {value!r}")


class _Refused(Exception):
    """An original argument value fastfilm cannot express; `shown` stands for the value in the message."""

    def __init__(self, why: str, shown: Any = None) -> None:
        super().__init__(why)
        self.why, self.shown = why, shown


# A handler maps one original argument: (value, "SOURCE: SECTION.ARG", the model section so far) → the model
# keys to set; it raises _Refused for a value fastfilm has no equivalent of.
_Handler = Callable[[Any, str, dict[str, Any]], dict[str, Any]]


def _to(key: str, convert: Callable[[Any], Any]) -> _Handler:
    """A handler that stores `convert(value)` under fastfilm's `key`."""
    return lambda value, where, m: {key: convert(value)}


def _to_flag(key: str) -> _Handler:
    """A handler that stores a 0/1 or true/false argument as a bool under fastfilm's `key`."""
    return lambda value, where, m: {key: _flag(value, where)}


def _check(ok: Callable[[Any], bool], why: str, key: str | None = None) -> _Handler:
    """A handler that refuses a value failing `ok` (with `why`) and stores an accepted one under `key`, if given."""

    def handle(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
        if not ok(value):
            raise _Refused(why)
        return {key: value} if key else {}

    return handle


def _skip(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
    """A handler for an argument with nothing to map."""
    return {}


def _feature_dim(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
    """The input's (C, H, W): 3 channels are pixels (the original's raw-image stem), else ResNet features."""
    dims = list(value)
    if len(dims) != 3 or dims[1] != dims[2]:
        raise _Refused("fastfilm needs (C, H, W) with H == W")
    if dims[0] == 3:
        return {"stem": "pixels", "image_size": int(dims[1])}
    return {"stem": "features", "feature_channels": int(dims[0]), "feature_size": int(dims[1])}


def _use_coords(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
    """Coordinate maps: the original's 0/1 (it has other values fastfilm lacks)."""
    if value not in (0, 1, True, False):
        raise _Refused("fastfilm has coordinate maps on (1) or off (0) only")
    return {"use_coords": bool(value)}


def _downsample_ok(value: Any) -> bool:
    """Whether a classifier_downsample is one fastfilm has: maxpool/avgpool K, or maxpoolfull/avgpoolfull."""
    ok = value == "maxpoolfull" or value == "avgpoolfull"
    return ok or (isinstance(value, str) and value[:7] in ("maxpool", "avgpool") and value[7:].isdigit())


def _condition_pattern(value: Any) -> list[int] | None:
    """The original's per-block conditioning pattern as 0/1 (None: every block)."""
    pattern = [1 if int(v) > 0 else 0 for v in value] if value else []
    return pattern or None


def _output_batchnorm(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
    """The generator's output BatchNorm: only off, as fastfilm has none."""
    if _flag(value, where):
        raise _Refused("fastfilm has no BatchNorm on the generator's output")
    return {}


def _parameter_efficient(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
    """The generator's layout: only the parameter-efficient one, the one fastfilm has."""
    if not _flag(value, where):
        raise _Refused("fastfilm's generator has the parameter-efficient layout (1) only")
    return {}


def _encoder_embed(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
    """Pretrained word vectors: only none (the vectors themselves are left out of the message)."""
    if value is not None:
        raise _Refused("pretrained word vectors are not an option of fastfilm", "…")
    return {}


def _same_as_network(arg: str) -> _Handler:
    """A handler for a FiLMGen argument that must equal the FiLMed network's (blocks, channels, layers)."""

    def handle(value: Any, where: str, m: dict[str, Any]) -> dict[str, Any]:
        ours = {"num_modules": m.get("num_blocks", 4), "module_dim": m.get("module_dim", 128)}
        ours["module_num_layers"] = 1
        if int(value) != ours[arg]:
            raise _Refused(f"differs from the FiLMed network's ({ours[arg]})")
        return {}

    return handle


def _special_token(idx: int) -> _Handler:
    """A handler for a special token id the original lets one set: only fastfilm's id `idx`."""
    return _check(lambda v: v == idx, "fastfilm's special tokens are <NULL>=0, <START>=1, <END>=2")


def _optional_int(value: Any) -> int | None:
    """int(value), keeping None (the original's "default padding")."""
    return None if value is None else int(value)


# ---- FiLMedNet (execution_engine_kwargs): original argument → handler (arguments not listed are refused).
_EE_ARGS: dict[str, _Handler] = {
    **{arg: _skip for arg in (*_NO_EFFECT, "vocab")},
    "feature_dim": _feature_dim,
    **{
        arg: _to(arg, int)
        for arg in ("stem_num_layers", "stem_kernel_size", "stem_stride", "module_dim", "module_kernel_size")
    },
    "stem_padding": _to("stem_padding", _optional_int),
    **{
        arg: _to_flag(arg)
        for arg in (
            "stem_batchnorm",
            "module_residual",
            "module_batchnorm",
            "module_batchnorm_affine",
            "classifier_batchnorm",
            "use_gamma",
            "use_beta",
        )
    },
    "use_coords": _use_coords,
    "module_dropout": _to("module_dropout", float),
    "classifier_dropout": _to("classifier_dropout", float),
    "module_input_proj": _to("module_input_proj", int),  # True (older files) → 1
    "num_modules": _to("num_blocks", int),
    "module_num_layers": _check(lambda v: int(v) == 1, "fastfilm has one conv layer per ResBlock (1)"),
    "classifier_proj_dim": _to("classifier_proj_dim", lambda v: int(v) if v is not None else 0),
    "classifier_downsample": _check(
        _downsample_ok, "fastfilm has maxpool/avgpool K or full", "classifier_downsample"
    ),
    "classifier_fc_layers": _to("classifier_fc_dims", lambda v: [int(x) for x in v]),
    "condition_method": _check(
        lambda v: v in CONDITION_METHODS, f"fastfilm has {', '.join(CONDITION_METHODS)}", "condition_method"
    ),
    "condition_pattern": _to("condition_pattern", _condition_pattern),
}
# The original FiLMedNet's defaults for arguments a file may lack (set after stem_padding's default).
_EE_DEFAULTS: dict[str, Any] = {
    "stem_num_layers": 2,
    "stem_kernel_size": 3,
    "stem_stride": 1,
    "stem_batchnorm": False,
    "module_batchnorm": False,
    "classifier_downsample": "maxpool2",
    "classifier_batchnorm": False,
    "module_dropout": 0.0,
}

# ---- FiLMGen (program_generator_kwargs): original argument → handler (arguments not listed are refused).
_PG_ARGS: dict[str, _Handler] = {
    # vocabulary sizes come from the weights and the vocabulary
    **{arg: _skip for arg in (*_NO_EFFECT, "encoder_vocab_size", "decoder_vocab_size")},
    **{arg: _special_token(idx) for idx, arg in enumerate(("null_token", "start_token", "end_token"))},
    "encoder_embed": _encoder_embed,
    "wordvec_dim": _to("wordvec_dim", int),
    "hidden_dim": _to("rnn_hidden_dim", int),
    "rnn_num_layers": _to("rnn_num_layers", int),
    "rnn_dropout": _to("rnn_dropout", float),
    "output_batchnorm": _output_batchnorm,
    "bidirectional": _to_flag("bidirectional"),
    "encoder_type": _check(
        lambda v: v in ("gru", "lstm"), "fastfilm's question encoder is a gru or an lstm", "encoder_type"
    ),
    "decoder_type": _check(lambda v: v == "linear", "fastfilm's FiLM decoder is one linear layer ('linear')"),
    "gamma_option": _to("gamma_option", lambda v: v),
    "gamma_baseline": _to("gamma_baseline", float),
    "parameter_efficient": _parameter_efficient,
    **{arg: _same_as_network(arg) for arg in ("num_modules", "module_dim", "module_num_layers")},
}
# The original FiLMGen's defaults for arguments a file may lack.
_PG_DEFAULTS: dict[str, Any] = {
    "wordvec_dim": 200,
    "rnn_hidden_dim": 512,
    "rnn_num_layers": 1,
    "gamma_baseline": 1.0,
}


def _refusal(source: str, arg: str, value: Any, why: str) -> ConfigError:
    """The one-line error for an original argument fastfilm cannot express."""
    return ConfigError(f"{source}: original argument {arg}={value!r}: {why}")


def _map_args(
    kwargs: Mapping[str, Any], section: str, handlers: Mapping[str, _Handler], m: dict[str, Any], source: str
) -> None:
    """Map every argument of one kwargs dict into the model section `m`, in the file's order."""
    for arg, value in kwargs.items():
        label = f"{section}.{arg}"
        handler = handlers.get(arg)
        if handler is None:
            raise _refusal(source, label, value, "fastfilm has no switch for this argument")
        try:
            m.update(handler(value, f"{source}: {label}", m))
        except _Refused as e:
            raise _refusal(source, label, value if e.shown is None else e.shown, e.why) from None


def original_model_config(pg: Mapping[str, Any], ee: Mapping[str, Any], source: str) -> dict[str, Any]:
    """fastfilm's `model` section for the original's FiLMGen and FiLMedNet kwargs.

    Every argument is mapped or checked (`_EE_ARGS`, `_PG_ARGS`); one fastfilm cannot express raises
    ConfigError naming it.
    """
    ee, pg = dict(ee), dict(pg)
    for kw in (ee, pg):
        for arg, updates in _VALUE_UPDATES.items():
            if arg in kw and kw[arg] in updates:
                kw[arg] = updates[kw[arg]]
    m: dict[str, Any] = {}
    _map_args(ee, "execution_engine_kwargs", _EE_ARGS, m, source)
    if "feature_dim" not in ee:
        m.update(stem="features", feature_channels=1024, feature_size=14)  # the original's default
    if m.get("stem_padding") is None:
        k = m.get("stem_kernel_size", 3)
        if k % 2 == 0:
            raise _refusal(
                source,
                "execution_engine_kwargs.stem_padding",
                None,
                f"the original has no default for kernel {k}",
            )
        m["stem_padding"] = k // 2
    for key, value in _EE_DEFAULTS.items():
        m.setdefault(key, value)
    _map_args(pg, "program_generator_kwargs", _PG_ARGS, m, source)
    if "parameter_efficient" not in pg:  # the FiLMGen default (False) is a layout fastfilm does not have
        raise _refusal(
            source,
            "program_generator_kwargs.parameter_efficient",
            None,
            "absent means False, which fastfilm lacks",
        )
    for key, value in _PG_DEFAULTS.items():
        m.setdefault(key, value)
    return m


def original_vocab(vocab: Mapping[str, Any], source: str) -> dict[str, Any]:
    """fastfilm's vocab.json for the original's vocabulary (same ids; program tokens dropped)."""
    from fastfilm.data.tokenize import SPECIAL_TOKENS, vocab_hash

    out: dict[str, Any] = {"format": 1}
    for key in ("question_token_to_idx", "answer_token_to_idx"):
        tok = vocab.get(key) if isinstance(vocab, Mapping) else None
        if not isinstance(tok, Mapping) or not all(isinstance(v, int) for v in tok.values()):
            raise CheckpointError(f"{source}: vocab.{key} missing or not a token → id mapping")
        ids = sorted(tok.values())
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{source}: vocab.{key}: ids are not 0..{len(ids) - 1}")
        out[key] = {str(k): int(v) for k, v in sorted(tok.items(), key=lambda kv: kv[1])}
    for special, idx in SPECIAL_TOKENS.items():
        if out["question_token_to_idx"].get(special, idx) != idx:
            raise CheckpointError(f"{source}: vocab.question_token_to_idx: {special} is not {idx}")
    out["question_family_names"] = {}
    out["hash"] = vocab_hash(out["question_token_to_idx"], out["answer_token_to_idx"])
    return out


def _deepspeed_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The original's optimisation arguments as fastfilm's DeepSpeed section (Adam only; else the defaults)."""
    from fastfilm.core.config import default_deepspeed

    ds = default_deepspeed()
    if str(args.get("optimizer", "Adam")) == "Adam":
        params = ds["optimizer"]["params"]
        if isinstance(args.get("learning_rate"), (int, float)):
            params["lr"] = float(args["learning_rate"])
        if isinstance(args.get("weight_decay"), (int, float)):
            params["weight_decay"] = float(args["weight_decay"])
    if isinstance(args.get("batch_size"), int) and args["batch_size"] > 0:
        ds["train_micro_batch_size_per_gpu"] = int(args["batch_size"])
    return ds


def load_original(path: str) -> tuple[torch.nn.Module, Config, dict[str, Any], dict[str, Any]]:
    """(fastfilm model with the original's weights, its config, its vocab, provenance) for an original file."""
    from fastfilm.model import FiLMModel, from_original_state_dict

    ckpt = read_original_checkpoint(path)
    model_section = original_model_config(
        ckpt["program_generator_kwargs"], ckpt["execution_engine_kwargs"], path
    )
    vocab = original_vocab(ckpt["vocab"], path)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
    raw = {
        "model": model_section,
        "data": {"image_source": "features" if model_section["stem"] == "features" else "cache"},
        "deepspeed": _deepspeed_from_args(args),
    }
    cfg = config_from_dict(raw, source=f"{path} (mapped)")
    state = from_original_state_dict(
        {
            "program_generator_state": ckpt["program_generator_state"],
            "execution_engine_state": ckpt["execution_engine_state"],
        }
    )
    model = FiLMModel(
        cfg.model, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]), kernels="reference"
    )
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise CheckpointError(
            f"{path}: the weights do not fit the model its arguments describe (unexpected: "
            f"{', '.join(unexpected[:5]) or 'none'}; missing: {', '.join(missing[:5]) or 'none'})"
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: weight shapes do not fit the model (vocabulary of {len(vocab['question_token_to_idx'])} "
            f"words, {len(vocab['answer_token_to_idx'])} answers): {'; '.join(wrong[:3])}"
        )
    # 2017 files predate BatchNorm's num_batches_tracked: those keep the new model's zeros.
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)
    model.eval()
    info = {
        "imported_from": os.path.abspath(path),
        "best_val_acc": ckpt.get("best_val_acc"),
        "model_t": ckpt.get("model_t"),
        "args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    return model, cfg, vocab, info


def write_model_folder(
    model: torch.nn.Module, cfg: Config, vocab: dict, out: str, extra: dict | None = None
) -> str:
    """Write an exported-model folder (what `fastfilm export` writes, plus a manifest) atomically."""
    from fastfilm.files.checkpoint import (
        atomic_save_safetensors,
        atomic_write_json,
        model_state,
        write_manifest,
    )
    from fastfilm.files.export import check_export_target

    out = os.path.normpath(out)
    check_export_target(
        out, "--out"
    )  # an earlier model folder is replaced; any other folder is never deleted
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        atomic_save_safetensors(model_state(model), os.path.join(tmp, "model.safetensors"))
        atomic_write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
        atomic_write_json(os.path.join(tmp, "vocab.json"), vocab)
        if extra is not None:
            atomic_write_json(os.path.join(tmp, "original.json"), extra)
        write_manifest(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_original(path: str, out: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Import an original checkpoint into an exported-model folder; returns a summary.

    `overrides` (`section.key=value`, as `--set`) adjust the written config, e.g. `data.cache=...`, the cache
    `fastfilm eval` reads for this model.
    """
    from fastfilm.core.config import apply_overrides
    from fastfilm.files.export import check_export_target, load_model_folder
    from fastfilm.model import count_parameters

    check_export_target(os.path.normpath(out), "import-original --out")  # before any work
    model, cfg, vocab, info = load_original(path)
    if overrides:
        cfg = config_from_dict(apply_overrides(cfg.to_dict(), overrides), source=f"{path} (mapped, --set)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    write_model_folder(model, cfg, vocab, out, extra=info)
    load_model_folder(out)  # proves the folder loads into the described model
    return {
        "out": out,
        "stem": cfg.model.stem,
        "parameters": count_parameters(model),
        "question_tokens": len(vocab["question_token_to_idx"]),
        "answers": len(vocab["answer_token_to_idx"]),
        "best_val_acc": info["best_val_acc"],
    }


def run_import(args: argparse.Namespace) -> int:
    """`fastfilm import-original CKPT --out DIR`."""
    s = import_original(args.checkpoint, args.out, getattr(args, "overrides", ()))
    acc = (
        f", best val acc {s['best_val_acc']:.4f} in the original run"
        if isinstance(s["best_val_acc"], float)
        else ""
    )
    print(
        f"imported {args.checkpoint} → {s['out']}/ ({s['stem']} stem, {s['parameters']:,} parameters, "
        f"{s['question_tokens']} question tokens, {s['answers']} answer ids{acc})"
    )
    print(f"  evaluate it with: fastfilm eval --checkpoint {s['out']} --split val")
    return 0
