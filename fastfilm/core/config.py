"""The typed run configuration: one JSON file with `model`, `data`, `train`, `kernels` and `deepspeed` sections.

Defaults are the paper's (FiLM, AAAI 2018, best CLEVR model; the raw-pixel variant). `deepspeed` is a standard,
unmodified DeepSpeed config and is passed to `deepspeed.initialize` as it is.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastfilm.core.errors import FastfilmError

KERNEL_MODES = ("reference", "triton", "compile")
CONDITION_METHODS = ("bn-film", "conv-film", "relu-film", "block-input-film", "block-output-film")
GAMMA_OPTIONS = ("linear", "sigmoid", "tanh", "exp")
# `eval`, `predict`, `analyze --precision` (fastfilm.auto.inference_precision): the model's unless emulated here, the
# model's, or one dtype
INFERENCE_PRECISIONS = ("auto", "model", "fp32", "bf16", "fp16")


class ConfigError(FastfilmError, ValueError):
    """A config file or override is invalid; the message names the file, the key and what was expected."""

    label = "config error"


@dataclass
class ModelConfig:
    """The FiLM model: generator (question → γ, β) and FiLMed network (image → answer logits)."""

    # Visual stem. "pixels": 224×224 RGB → 4 × (conv 4×4 s2 p1, BN, ReLU). "features": ResNet-101 conv4
    # features (1024×14×14) → conv 3×3 s1 p1 (+ coordinate maps), BN, ReLU. None = the paper's value for the stem.
    stem: str = "pixels"
    image_size: int = 224
    feature_channels: int = 1024
    feature_size: int = 14
    stem_num_layers: int | None = None
    stem_kernel_size: int | None = None
    stem_stride: int | None = None
    stem_padding: int | None = None
    stem_batchnorm: bool = True
    # FiLMed ResBlocks.
    num_blocks: int = 4
    module_dim: int = 128
    module_kernel_size: int = 3
    module_input_proj: int = 1
    module_residual: bool = True
    module_batchnorm: bool = True
    module_batchnorm_affine: bool = False
    module_dropout: float = 0.0
    condition_method: str = "bn-film"
    condition_pattern: list[int] | None = None  # which blocks are FiLMed; None = all
    use_gamma: bool = True
    use_beta: bool = True
    gamma_option: str = "linear"
    gamma_baseline: float = 1.0
    use_coords: bool = True
    # FiLM generator.
    wordvec_dim: int = 200
    rnn_hidden_dim: int = 4096
    rnn_num_layers: int = 1
    rnn_dropout: float = 0.0
    bidirectional: bool = False
    encoder_type: str = "gru"
    # False: the question encoder runs outside autocast, in float32. On a GPU PyTorch's autocast runs cuDNN's RNN in
    # float16 whatever the autocast dtype (unscaled under bf16; README, "Precision"); true keeps that.
    rnn_autocast: bool = True
    # Classifier.
    classifier_proj_dim: int = 512
    classifier_fc_dims: list[int] = field(default_factory=lambda: [1024])
    classifier_downsample: str = "maxpoolfull"
    classifier_batchnorm: bool = True
    classifier_dropout: float = 0.0
    # Layout of the visual path's activations: "auto" = channels_last (NHWC) on a GPU, where cuDNN's bf16 convs
    # are fastest in it (no NCHW<->NHWC transposes), and channels_first (NCHW, the paper's) on a CPU;
    # "channels_first" or "channels_last" force one. The weights are converted after `deepspeed.initialize`.
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        paper = {
            "pixels": {"stem_num_layers": 4, "stem_kernel_size": 4, "stem_stride": 2, "stem_padding": 1},
            "features": {"stem_num_layers": 1, "stem_kernel_size": 3, "stem_stride": 1, "stem_padding": 1},
        }.get(self.stem)
        if paper is not None:
            for k, v in paper.items():
                if getattr(self, k) is None:
                    setattr(self, k, v)


@dataclass
class DataConfig:
    """Where the data lives and how the DALI loader reads it."""

    root: str = "data/CLEVR_v1.0"  # a CLEVR v1.0 folder (real or synthetic)
    cache: str = "data/cache/clevr"  # written by `fastfilm prep`
    image_source: str = "cache"  # "cache" (uint8 .npy written by prep --image-size), "png", or "features"
    # "dali" (the fast path; falls back to "torch" with one warning line where DALI is not importable) or "torch"
    # (torch.utils.data, pinned memory, non-blocking copies): the same batches, in the same order, for a seed.
    loader: str = "dali"
    train_split: str = "train"
    val_split: str = "val"
    num_threads: int = 2
    prefetch: int = 2
    max_val_questions: int = 0  # 0 = the whole split (exact count); >0 only for quick runs
    # Training batches of similar question lengths (fastfilm/data/buckets.py): fewer RNN steps per batch, batch
    # composition correlated with length. Off by default (the paper's uniformly shuffled batches).
    bucket_by_length: bool = False


@dataclass
class TrainConfig:
    """The training loop: epochs, early stopping, evaluation, checkpoints and logging."""

    run_dir: str = "runs/clevr"
    epochs: int = 80  # at most; early stopping usually ends sooner
    patience: int = 10  # evaluations without a better val accuracy before stopping (0 = never stop early)
    max_steps: int = 0  # 0 = no limit
    max_minutes: float = 0.0  # 0 = no limit; stops cleanly (checkpoint) when reached
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    log_every: int = 50  # optimizer steps between training-metric records
    # Optimizer steps between the ranks' agreement on stopping (signal, time budget) and on a non-finite loss:
    # one collective and one host sync per agreement, and always one before an evaluation or a save, so nothing
    # non-finite is ever saved. 1 = every step; larger lets a GPU queue steps without waiting (see README).
    sync_every: int = 10
    # Graph mode (fastfilm/graphed.py): the whole step (forward, loss, backward, clipping, Adam) at static shapes
    # (question lengths bucketed to multiples of 8), captured as CUDA graphs and replayed. "auto": on with a CUDA
    # device where supported (one rank, ZeRO stage 0, torch's fused Adam; fp16 runs it uncaptured); true: also with
    # several ranks, and on a CPU the same static-shape step runs eagerly (one log line); false: DeepSpeed's
    # engine.backward / engine.step as before.
    cuda_graphs: bool | str = "auto"
    # torch.compile of the whole model (fullgraph with kernels=reference), inside the graph mode's step. "auto":
    # `kernels.mode: auto` decides (on a CPU: on, with graph mode's static-shape step, where it can run: see
    # fastfilm/auto.py); off with any other kernels mode.
    compile: bool | str = "auto"
    seed: int = 0
    # "deepspeed": the DeepSpeed section's bf16/fp16/torch_autocast as written (float32 without them). "auto": chosen
    # by the machine and logged (fastfilm/auto.py); an explicit bf16/fp16/torch_autocast in the section still wins.
    precision: str = "deepspeed"
    film_reg_weight: float = 0.0  # beyond the paper: TADAM-style L2 on Δγ and β (0 = off)
    progress: bool = True
    tensorboard: bool = True
    dist_timeout_s: int = 600  # collective timeout: a dead rank takes the job down instead of hanging
    # Start from trained weights: a run folder, an exported model or an original checkpoint ("" = from scratch);
    # see fastfilm/init_from.py (a vocabulary that extends the source's grows the word embedding).
    init_from: str = ""
    trainable: str = "all"  # all | generator (FiLMed network frozen) | network (generator frozen)
    frozen_mode: str = "train"  # the frozen part's mode while training: train (BN stats adapt) | eval (fixed)


@dataclass
class KernelsConfig:
    """Which implementation runs the hot path: reference (plain PyTorch), triton, or compile; "auto": chosen by the
    machine when training starts (fastfilm/auto.py), logged, and written into the run folder's config.json."""

    mode: str = "reference"
    # `auto` on a GPU: the implementations each fused op site is timed with (fastfilm/kernel_pick.py); the
    # reference is always one of them
    candidates: list[str] = field(default_factory=lambda: ["reference", "triton"])


def default_deepspeed() -> dict[str, Any]:
    """The paper's optimisation as a standard DeepSpeed config (Adam 3e-4, coupled L2 1e-5, batch 64, fp32)."""
    return {
        "train_micro_batch_size_per_gpu": 64,  # left out when the user gives only train_batch_size
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-5},
        },
        "gradient_clipping": 0.0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 1000000000,
        "wall_clock_breakdown": False,
    }


@dataclass
class Config:
    """A whole run: model, data, train, kernels and the DeepSpeed section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    deepspeed: dict[str, Any] = field(default_factory=default_deepspeed)
    source: str = field(default="<defaults>", compare=False)
    # The keys the user's own DeepSpeed section gave (before the defaults were merged in): an explicit
    # bf16/fp16/torch_autocast there wins over train.precision=auto.
    deepspeed_user_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data (what a run folder's config.json holds)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("deepspeed_user_keys")
        return d

    @property
    def batch_size(self) -> int:
        """Micro-batch per rank (DeepSpeed's train_micro_batch_size_per_gpu; from train_batch_size on one rank
        when only that is given, until `resolve_batch` knows the number of ranks)."""
        ds = self.deepspeed
        if "train_micro_batch_size_per_gpu" in ds:
            return int(ds["train_micro_batch_size_per_gpu"])
        if "train_batch_size" in ds:
            return max(1, int(ds["train_batch_size"]) // int(ds.get("gradient_accumulation_steps", 1)))
        return 64

    def resolve_batch(self, world: int) -> None:
        """Make DeepSpeed's batch keys agree for `world` ranks (global = micro × accumulation × ranks), filling in
        the micro-batch from `train_batch_size` when only that is given; raises ConfigError when they cannot."""
        ds = self.deepspeed
        accum = int(ds.get("gradient_accumulation_steps", 1))
        if "train_batch_size" not in ds:
            return
        tb = ds["train_batch_size"]
        if "train_micro_batch_size_per_gpu" in ds:
            micro = ds["train_micro_batch_size_per_gpu"]
            if tb != micro * accum * world:
                raise ConfigError(
                    f"{self.source}: deepspeed.train_batch_size={tb} is not train_micro_batch_size_per_gpu "
                    f"({micro}) × gradient_accumulation_steps ({accum}) × {world} rank(s) = {micro * accum * world}"
                )
        elif tb % (accum * world):
            raise ConfigError(
                f"{self.source}: deepspeed.train_batch_size={tb} is not divisible by gradient_accumulation_steps "
                f"({accum}) × {world} rank(s); use a multiple of {accum * world}"
            )
        else:
            ds["train_micro_batch_size_per_gpu"] = tb // (accum * world)

    @property
    def lr(self) -> float:
        """The optimizer's learning rate (the merged DeepSpeed section always has it)."""
        return float(self.deepspeed["optimizer"]["params"]["lr"])


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "kernels": KernelsConfig,
}


def merge_deepspeed(user: dict[str, Any]) -> dict[str, Any]:
    """The user's DeepSpeed section over `default_deepspeed()`, key by key (nested objects merged, not replaced).

    The one place defaults enter the section: `optimizer.params.weight_decay` stays the paper's 1e-5 when the user
    sets only the learning rate. A user-given `train_batch_size` without a micro-batch keeps DeepSpeed's meaning
    (the micro-batch is derived from it per world size), so the default micro-batch is not added then.
    """

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    base = default_deepspeed()
    if "train_batch_size" in user and "train_micro_batch_size_per_gpu" not in user:
        del base["train_micro_batch_size_per_gpu"]
    return merge(base, copy.deepcopy(user))


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The options every command that reads a config takes: --config, --kernels and repeatable --set."""
    p.add_argument("--config", required=True, help="JSON config file (see configs/)")
    p.add_argument(
        "--kernels",
        choices=[*KERNEL_MODES, "auto"],
        default=None,
        help="hot-path implementation (overrides kernels.mode in the config; auto: chosen by the machine)",
    )
    add_set_arg(p, "override one config value (repeatable), e.g. --set train.epochs=3")


def add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set SECTION.KEY=VALUE` option (collected in `overrides`)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help
    )


def _closest(name: str, options: Iterable[str]) -> str:
    m = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else f" (valid keys: {', '.join(sorted(options))})"


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` when lossless, else raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build_section(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object with keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'{_closest(key, fields)}")
        kwargs[key] = _check_type(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2:
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE (e.g. train.epochs=3)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare string such as kernels.mode=triton
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as JSON when they parse) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        section = path[0]
        if section not in (*_SECTIONS, "deepspeed"):
            raise ConfigError(f"--set {item!r}: unknown section '{section}'{_closest(section, _SECTIONS)}")
        node = raw.setdefault(section, {})
        if section == "deepspeed":
            for p in path[1:-1]:
                node = node.setdefault(p, {})
        elif len(path) != 2:
            raise ConfigError(f"--set {item!r}: expected {section}.KEY=VALUE")
        else:  # name the override, not the config file, when the key is misspelled on the command line
            fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
            if path[1] not in fields:
                raise ConfigError(
                    f"--set {item!r}: unknown key '{path[1]}' in {section}{_closest(path[1], fields)}"
                )
        node[path[-1]] = value
    return raw


def validate(cfg: Config) -> None:
    """Reject impossible values with one clear line naming the key."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_run(cfg)
    _validate_deepspeed(cfg)
    _check_deepspeed_keys(cfg)
    _check_adam_and_clipping(cfg)


def _check_adam_and_clipping(cfg: Config) -> None:
    """Adam's betas and eps and the gradient clipping, which torch or DeepSpeed would reject (or misread) only
    after set-up."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    params = cfg.deepspeed.get("optimizer", {}).get("params", {})
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)):
        raise _bad(cfg, "deepspeed.optimizer.params.betas", f"expected two numbers in [0, 1), got {betas!r}")
    eps = params.get("eps", 1e-8)
    if not (number(eps) and eps >= 0):
        raise _bad(cfg, "deepspeed.optimizer.params.eps", f"must be a number >= 0, got {eps!r}")
    clip = cfg.deepspeed.get("gradient_clipping", 0.0)
    if not (number(clip) and clip >= 0):
        raise _bad(cfg, "deepspeed.gradient_clipping", f"must be a number >= 0 (0 = off), got {clip!r}")


# fastfilm builds the optimizer itself (`train.build_optimizer`): every key it reads.
OPTIMIZER_KEYS = ("type", "params")
OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay")
# DeepSpeed's top-level config keys (0.17-0.19). A key that is not one of them but close to one is taken for a
# misspelling (DeepSpeed itself ignores unknown top-level keys); a key far from all of them is passed on as it is.
DEEPSPEED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "fp16", "bf16", "bfloat16", "torch_autocast", "amp",
    "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "aio", "activation_checkpointing", "sparse_attention", "flops_profiler", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "dump_state", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "elasticity", "autotuning", "data_efficiency", "curriculum_learning", "compression_training",
    "checkpoint", "data_types", "pipeline", "progressive_layer_drop", "eigenvalue", "quantize_training",
    "disable_allgather", "dataloader_drop_last", "nebula", "weight_quantization", "hybrid_engine", "compile",
    "timers", "graph_harvesting", "use_data_before_expert_parallelism", "gradient_allreduce_op",
    "disable_python_gc", "log_level", "managed_gradient_accumulation", "expert_parallel", "vocabulary_size",
    "tensor_parallel", "sequence_parallel_size",
)  # fmt: skip


def _check_deepspeed_keys(cfg: Config) -> None:
    """Misspelled DeepSpeed keys (see DEEPSPEED_KEYS), optimizer keys fastfilm does not read, and ZeRO keys
    DeepSpeed would refuse only once training has started: one line naming the key, before any work."""
    ds = cfg.deepspeed
    for key in ds:
        near = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1, cutoff=0.8)
        if key not in DEEPSPEED_KEYS and near:
            raise _bad(cfg, f"deepspeed.{key}", f"not a DeepSpeed key (did you mean '{near[0]}'?)")
    opt = ds.get("optimizer", {})
    for where, keys, valid in (
        ("deepspeed.optimizer", opt, OPTIMIZER_KEYS),
        ("deepspeed.optimizer.params", opt.get("params", {}), OPTIMIZER_PARAMS),
    ):
        for key in keys:
            if key not in valid:
                near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                msg = f"unknown key{hint}; fastfilm builds Adam itself and reads only {', '.join(valid)} here"
                raise _bad(cfg, f"{where}.{key}", msg)
    zero = ds.get("zero_optimization", {})
    # DeepSpeed's own (pydantic) check of the ZeRO section, when it holds more than the stage.
    if set(zero) - {"stage"}:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        try:
            DeepSpeedZeroConfig(**zero)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise _bad(cfg, f"deepspeed.zero_optimization.{where}", err["msg"]) from None
        except (TypeError, ValueError) as e:
            raise _bad(cfg, "deepspeed.zero_optimization", str(e).strip().splitlines()[0]) from None


def _bad(cfg: Config, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{cfg.source}: {key}: {msg}")


def _choice(cfg: Config, key: str, value: str, options: Iterable[str]) -> None:
    if value not in options:
        raise _bad(cfg, key, f"'{value}' is not one of {', '.join(options)}{_closest(value, options)}")


def _validate_model(cfg: Config) -> None:
    m, d = cfg.model, cfg.data

    def bad(key: str, msg: str) -> ConfigError:
        return _bad(cfg, key, msg)

    def choice(key: str, value: str, options: Iterable[str]) -> None:
        _choice(cfg, key, value, options)

    choice("kernels.mode", cfg.kernels.mode, (*KERNEL_MODES, "auto"))
    cands = cfg.kernels.candidates
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
        raise bad("kernels.candidates", f"expected a non-empty list of kernel modes, got {cands!r}")
    for c in cands:
        choice("kernels.candidates", c, KERNEL_MODES)
    choice("model.stem", m.stem, ("pixels", "features"))
    choice("model.condition_method", m.condition_method, CONDITION_METHODS)
    choice("model.gamma_option", m.gamma_option, GAMMA_OPTIONS)
    choice("model.encoder_type", m.encoder_type, ("gru", "lstm"))
    choice("model.memory_format", m.memory_format, ("auto", "channels_first", "channels_last"))
    choice("data.image_source", d.image_source, ("cache", "png", "features"))
    choice("data.loader", d.loader, ("dali", "torch"))
    if not re.fullmatch(r"(max|avg)pool(full|[1-9])", m.classifier_downsample):
        raise bad(
            "model.classifier_downsample",
            f"expected maxpoolfull, avgpoolfull, maxpoolK or avgpoolK (K = 1..9), got {m.classifier_downsample!r}",
        )
    for key in ("num_blocks", "module_dim", "wordvec_dim", "rnn_hidden_dim", "rnn_num_layers", "image_size"):
        if getattr(m, key) <= 0:
            raise bad(f"model.{key}", f"must be > 0, got {getattr(m, key)}")
    if m.module_kernel_size % 2 == 0 or m.module_input_proj % 2 == 0 and m.module_input_proj != 0:
        raise bad(
            "model.module_kernel_size", "kernel sizes of the ResBlock must be odd (as the original code)"
        )
    if m.bidirectional and m.rnn_hidden_dim % 2:
        raise bad("model.rnn_hidden_dim", "must be even when bidirectional (split between the directions)")
    if any(d <= 0 for d in m.classifier_fc_dims):
        raise bad("model.classifier_fc_dims", f"every size must be > 0, got {m.classifier_fc_dims}")
    for key in ("module_dropout", "classifier_dropout", "rnn_dropout"):
        if not 0 <= getattr(m, key) < 1:
            raise bad(f"model.{key}", f"must be in [0, 1), got {getattr(m, key)}")
    if m.stem_num_layers <= 0 or m.stem_kernel_size <= 0 or m.stem_stride <= 0 or m.stem_padding < 0:
        raise bad(
            "model.stem_*", "stem_num_layers, stem_kernel_size and stem_stride must be > 0, stem_padding >= 0"
        )
    if m.condition_pattern is not None and any(p not in (0, 1) for p in m.condition_pattern):
        raise bad("model.condition_pattern", f"expected 0/1 per block, got {m.condition_pattern}")
    if m.condition_pattern is not None and len(m.condition_pattern) != m.num_blocks:
        raise bad(
            "model.condition_pattern",
            f"has {len(m.condition_pattern)} entries, expected one per block (num_blocks={m.num_blocks})",
        )
    if (m.stem == "features") != (d.image_source == "features"):
        raise bad("data.image_source", f"'{d.image_source}' does not fit model.stem='{m.stem}'")


def _validate_data(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    for key in ("num_threads", "prefetch"):
        if getattr(d, key) < 1:
            raise _bad(cfg, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    if d.max_val_questions < 0:
        raise _bad(
            cfg, "data.max_val_questions", f"must be >= 0 (0 = the whole split), got {d.max_val_questions}"
        )
    if t.seed < 0:
        raise _bad(cfg, "train.seed", f"must be >= 0, got {t.seed}")
    if t.dist_timeout_s < 1:
        raise _bad(cfg, "train.dist_timeout_s", f"must be >= 1 (seconds), got {t.dist_timeout_s}")


def _validate_run(cfg: Config) -> None:
    t = cfg.train

    def bad(key: str, msg: str) -> ConfigError:
        return _bad(cfg, key, msg)

    def choice(key: str, value: str, options: Iterable[str]) -> None:
        _choice(cfg, key, value, options)

    if not t.run_dir.strip():
        raise bad("train.run_dir", "must name a folder, got an empty string")
    if t.epochs <= 0:
        raise bad("train.epochs", f"must be > 0, got {t.epochs}")
    if t.patience < 0 or t.max_steps < 0 or t.eval_every < 0 or t.max_minutes < 0:
        raise bad("train", "patience, max_steps, eval_every and max_minutes must be >= 0")
    if t.log_every < 1 or t.sync_every < 1:
        raise bad("train", f"log_every and sync_every must be >= 1, got {t.log_every} and {t.sync_every}")
    if t.film_reg_weight < 0:
        raise bad("train.film_reg_weight", "must be >= 0")
    for key in ("cuda_graphs", "compile"):
        value = getattr(t, key)
        if isinstance(value, str) and value != "auto":
            raise bad(f"train.{key}", f"expected true, false or 'auto', got {value!r}")
    choice("train.trainable", t.trainable, ("all", "generator", "network"))
    choice("train.precision", t.precision, ("deepspeed", "auto"))
    choice("train.frozen_mode", t.frozen_mode, ("train", "eval"))


def _validate_deepspeed(cfg: Config) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return _bad(cfg, key, msg)

    ds = cfg.deepspeed
    if not isinstance(ds, dict):
        raise bad("deepspeed", "expected an object (a standard DeepSpeed config)")
    for name in ("optimizer", "scheduler", "bf16", "fp16", "zero_optimization", "torch_autocast"):
        if name in ds and not isinstance(ds[name], dict):
            raise bad(f"deepspeed.{name}", f"expected an object, got {type(ds[name]).__name__} {ds[name]!r}")
    opt = ds.get("optimizer", {})
    if "params" in opt and not isinstance(opt["params"], dict):
        raise bad("deepspeed.optimizer.params", f"expected an object, got {type(opt['params']).__name__}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        v = ds.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(f"deepspeed.{key}", f"must be a positive integer, got {v!r}")
    if "train_batch_size" in ds and "train_micro_batch_size_per_gpu" in ds:
        per_rank = ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1)
        if ds["train_batch_size"] % per_rank:  # no number of ranks makes them agree
            raise bad(
                "deepspeed.train_batch_size",
                f"{ds['train_batch_size']} is not a multiple of train_micro_batch_size_per_gpu × "
                f"gradient_accumulation_steps = {per_rank}",
            )
    params = opt.get("params", {})
    lr = params.get("lr", 3e-4)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or lr == float("inf"):
        raise bad("deepspeed.optimizer.params.lr", f"must be a number > 0, got {lr!r}")
    wd = params.get("weight_decay", 1e-5)
    if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not wd >= 0:
        raise bad("deepspeed.optimizer.params.weight_decay", f"must be a number >= 0, got {wd!r}")
    opt_type = str(opt.get("type", "Adam")).lower()
    if opt_type not in ("adam", "adamw"):
        raise bad("deepspeed.optimizer.type", f"'{opt_type}': fastfilm supports Adam (the paper) and AdamW")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise bad("deepspeed", "bf16.enabled and fp16.enabled are both true: pick one")
    if ds.get("fp16", {}).get("enabled"):
        if ds.get("zero_optimization", {}).get("stage", 0) != 0:
            raise bad(
                "deepspeed.fp16",
                "needs zero_optimization.stage 0 (DeepSpeed scales the loss of autocast runs only without "
                "ZeRO); use bf16 with ZeRO",
            )
        for key, low in (("initial_scale_power", 0), ("loss_scale_window", 1)):
            v = ds["fp16"].get(key, low)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise bad(f"deepspeed.fp16.{key}", f"must be an integer >= {low}, got {v!r}")
        if ds["fp16"].get("loss_scale", 0) not in (0, 0.0):
            raise bad(
                "deepspeed.fp16.loss_scale",
                f"only dynamic loss scaling (0) is supported, got {ds['fp16']['loss_scale']!r}",
            )


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config from a raw dict (the parsed JSON file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    for key in raw:
        if key not in (*_SECTIONS, "deepspeed"):
            raise ConfigError(f"{source}: unknown section '{key}'{_closest(key, (*_SECTIONS, 'deepspeed'))}")
    sections = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _build_section(cls, raw.get(name, {}), f"{source}: {name}")
    user_ds = raw.get("deepspeed", {})
    if not isinstance(user_ds, dict):
        raise ConfigError(f"{source}: deepspeed: expected an object (a standard DeepSpeed config)")
    for name in ("optimizer", "scheduler", "bf16", "fp16", "zero_optimization", "torch_autocast"):
        if name in user_ds and not isinstance(user_ds[name], dict):
            raise ConfigError(
                f"{source}: deepspeed.{name}: expected an object, got {type(user_ds[name]).__name__} "
                f"{user_ds[name]!r}"
            )
    cfg = Config(
        **sections, deepspeed=merge_deepspeed(user_ds), source=source, deepspeed_user_keys=tuple(user_ds)
    )
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), kernels: str | None = None) -> Config:
    """Read a JSON config file, apply `--set` overrides and `--kernels`, and validate it (raises ConfigError)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:  # e.g. an image or a binary file given as --config
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); expected JSON"
        ) from None
    overrides = list(overrides)
    if kernels is not None:
        overrides.append(f"kernels.mode={kernels}")
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=path)
