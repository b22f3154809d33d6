"""Run the original FiLM code (github.com/ethanjperez/film, 2017) from a checkout the user names, for logit
parity and speed comparisons in the same process (`pytest bench/test_original.py --original-film PATH`).

Nothing of the original is copied into fastfilm: its files are read from PATH at run time. To run 2017 code on
torch 2.x without a GPU, its modules are loaded with three in-memory changes, none of which alters its maths:
- `.type(torch.cuda.FloatTensor)` (coordinate maps, the γ≡1/β≡0 defaults, the ResBlock input buffer) becomes
  a copy to the chosen device and dtype (`set_device_dtype`); on CUDA in float32 that is what it did;
- modules it imports but does not need for FiLMGen/FiLMedNet (`ipdb`, `termcolor`, `torchvision`) are stubbed
  when they are not installed;
- `vr/__init__.py` and `vr/models/__init__.py` are not run (they import models we do not use).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

_FF = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
_CUDA_CAST = ".type(torch.cuda.FloatTensor)"
_LOADED: dict[str, types.SimpleNamespace] = {}


def set_device_dtype(device: torch.device | str, dtype: torch.dtype) -> None:
    """Where the original's `torch.cuda.FloatTensor` casts put their tensors (device and dtype)."""
    _FF.device, _FF.dtype = torch.device(device), dtype


def _stub(name: str, **attrs) -> None:
    """An empty stand-in for a module the original imports but FiLMGen/FiLMedNet never use (if not installed)."""
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def _load_module(name: str, path: str) -> types.ModuleType:
    with open(path, encoding="utf-8") as f:
        src = f.read()
    src = src.replace(_CUDA_CAST, ".to(device=_FF.device, dtype=_FF.dtype, copy=True)")
    mod = types.ModuleType(name)
    mod.__file__ = path
    mod._FF = _FF
    sys.modules[name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def load(path: str) -> types.SimpleNamespace:
    """The original's FiLMGen and FiLMedNet classes from a checkout at `path` (ValueError if it is not one)."""
    path = os.path.abspath(path)
    if path in _LOADED:
        return _LOADED[path]
    vr = os.path.join(path, "vr")
    needed = ["embedding.py", "programs.py", "models/layers.py", "models/film_gen.py", "models/filmed_net.py"]
    missing = [f for f in needed if not os.path.isfile(os.path.join(vr, f))]
    if missing:
        raise ValueError(f"{path}: not a checkout of ethanjperez/film (no vr/{', vr/'.join(missing)})")
    _stub("ipdb", set_trace=lambda *a, **k: None)
    _stub("termcolor", colored=lambda text, *a, **k: text)
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
        tv.models = tvm
        sys.modules.update({"torchvision": tv, "torchvision.models": tvm})
    for pkg, folder in (("vr", vr), ("vr.models", os.path.join(vr, "models"))):
        mod = types.ModuleType(pkg)
        mod.__path__ = [folder]
        sys.modules[pkg] = mod
    sys.modules["vr"].models = sys.modules["vr.models"]
    for name in ("embedding", "programs"):
        setattr(sys.modules["vr"], name, _load_module(f"vr.{name}", os.path.join(vr, f"{name}.py")))
    for name in ("layers", "film_gen", "filmed_net"):
        setattr(
            sys.modules["vr.models"],
            name,
            _load_module(f"vr.models.{name}", os.path.join(vr, "models", f"{name}.py")),
        )
    out = types.SimpleNamespace(
        FiLMGen=sys.modules["vr.models.film_gen"].FiLMGen,
        FiLMedNet=sys.modules["vr.models.filmed_net"].FiLMedNet,
    )
    _LOADED[path] = out
    return out


def build(path: str, cfg, vocab_size: int, num_answers: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The original's (FiLMGen, FiLMedNet) for a fastfilm model config, with `scripts/train_model.py`'s
    arguments (parameter-efficient generator, linear decoder); on `set_device_dtype`'s device and dtype."""
    orig = load(path)
    # Its coordinate maps come from `torch.linspace` in the default dtype: build in the chosen dtype, so that a
    # float64 comparison is not limited by float32 coordinates (in float32 this changes nothing).
    default = torch.get_default_dtype()
    torch.set_default_dtype(_FF.dtype)
    try:
        return _build(orig, cfg, vocab_size, num_answers)
    finally:
        torch.set_default_dtype(default)


def _build(orig, m, vocab_size: int, num_answers: int):
    if m.stem == "pixels":
        feature_dim = (3, m.image_size, m.image_size)
    else:
        feature_dim = (m.feature_channels, m.feature_size, m.feature_size)
    gen = orig.FiLMGen(
        encoder_vocab_size=vocab_size,
        wordvec_dim=m.wordvec_dim,
        hidden_dim=m.rnn_hidden_dim,
        rnn_num_layers=m.rnn_num_layers,
        rnn_dropout=m.rnn_dropout,
        parameter_efficient=True,
        output_batchnorm=False,
        bidirectional=m.bidirectional,
        encoder_type=m.encoder_type,
        decoder_type="linear",
        gamma_option=m.gamma_option,
        gamma_baseline=m.gamma_baseline,
        num_modules=m.num_blocks,
        module_num_layers=1,
        module_dim=m.module_dim,
    )
    net = orig.FiLMedNet(
        {"answer_idx_to_token": list(range(num_answers))},
        feature_dim=feature_dim,
        stem_batchnorm=m.stem_batchnorm,
        stem_num_layers=m.stem_num_layers,
        stem_kernel_size=m.stem_kernel_size,
        stem_stride=m.stem_stride,
        stem_padding=m.stem_padding,
        num_modules=m.num_blocks,
        module_dim=m.module_dim,
        module_residual=m.module_residual,
        module_batchnorm=m.module_batchnorm,
        module_batchnorm_affine=m.module_batchnorm_affine,
        module_dropout=m.module_dropout,
        module_input_proj=m.module_input_proj,
        module_kernel_size=m.module_kernel_size,
        classifier_proj_dim=m.classifier_proj_dim,
        classifier_downsample=m.classifier_downsample,
        classifier_fc_layers=tuple(m.classifier_fc_dims),
        classifier_batchnorm=m.classifier_batchnorm,
        classifier_dropout=m.classifier_dropout,
        condition_method=m.condition_method,
        condition_pattern=list(m.condition_pattern or []),
        use_gamma=m.use_gamma,
        use_beta=m.use_beta,
        use_coords=1 if m.use_coords else 0,
    )
    return gen.to(_FF.device, _FF.dtype), net.to(_FF.device, _FF.dtype)


def load_weights(gen: torch.nn.Module, net: torch.nn.Module, fastfilm_model: torch.nn.Module) -> None:
    """Copy a fastfilm model's weights into the original's modules (`fastfilm.model.to_original_state_dict`)."""
    from fastfilm.model import to_original_state_dict

    sd = to_original_state_dict(fastfilm_model.state_dict())
    gen.load_state_dict(sd["program_generator_state"])
    net.load_state_dict(sd["execution_engine_state"])


def logits(gen: torch.nn.Module, net: torch.nn.Module, images: torch.Tensor, questions: torch.Tensor):
    """The original's answer logits: `FiLMedNet(images, FiLMGen(questions))` (it edits `questions`: a copy)."""
    return net(images, gen(questions.clone()))
