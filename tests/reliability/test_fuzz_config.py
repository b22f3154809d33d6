"""Fuzz the config parser: any JSON either loads or raises ConfigError, never another exception."""

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfilm.config import ConfigError, DataConfig, ModelConfig, TrainConfig, config_from_dict, load_config

KEYS = ["model", "data", "train", "kernels", "deepspeed", "modle", "num_blocks", "module_dim", "lr", "epochs",
        "mode", "stem", "condition_pattern", "optimizer", "params", "bf16", "enabled", "use_coords", "x"]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=12,
)


def section_keys(cls):
    return [f.name for f in dataclasses.fields(cls)]


DS_KEYS = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler", "bf16",
           "fp16", "zero_optimization", "params", "lr", "weight_decay", "type", "enabled", "torch_autocast",
           "train_batch_size", "stage", "loss_scale", "initial_scale_power", "loss_scale_window"]  # fmt: skip
shaped = st.fixed_dictionaries(
    {},
    optional={
        "model": st.dictionaries(st.sampled_from(section_keys(ModelConfig)), json_values, max_size=4),
        "data": st.dictionaries(st.sampled_from(section_keys(DataConfig)), json_values, max_size=3),
        "train": st.dictionaries(st.sampled_from(section_keys(TrainConfig)), json_values, max_size=3),
        "kernels": st.dictionaries(st.sampled_from(["mode", "x"]), json_values, max_size=2),
        "deepspeed": st.recursive(
            json_values, lambda c: st.dictionaries(st.sampled_from(DS_KEYS), c, max_size=4), max_leaves=10
        ),
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shaped)
def test_schema_shaped_configs_raise_only_config_error(raw):
    try:
        cfg = config_from_dict(raw, source="fuzz.json")
        cfg.resolve_batch(2)  # what the trainer does once it knows the number of ranks
        assert cfg.batch_size >= 1
    except ConfigError:
        pass


@pytest.mark.parametrize(
    "raw",
    [
        {"deepspeed": {"optimizer": [1]}},
        {"deepspeed": {"optimizer": {"params": 3}}},
        {"deepspeed": {"bf16": 1}},
        {"deepspeed": {"train_micro_batch_size_per_gpu": 1e30}},
        {"deepspeed": {"optimizer": {"params": {"lr": float("nan")}}}},
        {"model": {"classifier_fc_dims": [0]}},
        {"model": {"condition_pattern": [2, 1, 1, 1]}},
        {"model": {"stem_stride": 0}},
        {"deepspeed": {"fp16": {"enabled": True, "initial_scale_power": "16"}}},
        {"deepspeed": {"train_batch_size": 65, "train_micro_batch_size_per_gpu": 8}},
    ],
)
def test_known_crashers_are_config_errors(raw):
    # Cases an earlier version of the parser crashed on (AttributeError) or accepted.
    with pytest.raises(ConfigError):
        config_from_dict(raw, source="case.json")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_config_from_dict_raises_only_config_error(raw):
    try:
        config_from_dict(raw, source="fuzz.json")
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["model", "data", "train", "kernels", "deepspeed", "bogus"]),
    st.sampled_from(KEYS),
    json_values,
)
def test_overrides_raise_only_config_error(section, key, value):
    try:
        load_config("configs/synthetic.json", [f"{section}.{key}={json.dumps(value)}"])
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_malformed_override_strings(text):
    try:
        load_config("configs/synthetic.json", [text])
    except ConfigError:
        pass
