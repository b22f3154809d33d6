"""Config files and overrides: paper defaults, and one clear message for each kind of mistake."""

import json

import pytest

from fastfilm.cli import main as cli_main
from fastfilm.config import ConfigError, load_config


def write(tmp_path, obj, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_shipped_configs_load():
    for name in ("clevr", "clevr_features", "clevr_humans", "clevr_cogent"):
        cfg = load_config(f"configs/{name}.json")
        assert cfg.kernels.mode == "reference"  # the paper configs: the reference (specification) path
    synthetic = load_config(
        "configs/synthetic.json"
    )  # `make train`: chosen by the machine (fastfilm/auto.py)
    assert synthetic.kernels.mode == "auto" and synthetic.train.precision == "auto"
    assert not {"bf16", "fp16", "torch_autocast"} & set(synthetic.deepspeed_user_keys)  # nothing explicit
    paper = load_config("configs/clevr.json")
    assert paper.batch_size == 64 and paper.lr == 3e-4
    assert paper.deepspeed["optimizer"]["params"]["weight_decay"] == 1e-5


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = write(tmp_path, {"model": {"modul_dim": 64}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "modul_dim" in msg and p in msg and "module_dim" in msg


def test_deepspeed_keys_far_from_any_misspelling_pass_through(tmp_path):
    """Only near-misses of DeepSpeed's keys are refused: its other keys, and ZeRO keys it accepts, pass."""
    ds = {
        "zero_optimization": {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 5e7},
        "flops_profiler": {"enabled": False},
        "some_future_deepspeed_feature": {"enabled": True},
    }
    cfg = load_config(write(tmp_path, {"deepspeed": ds}))
    assert cfg.deepspeed["zero_optimization"]["overlap_comm"] is True
    assert cfg.deepspeed["some_future_deepspeed_feature"] == {"enabled": True}


def test_a_binary_file_as_config_is_one_line(tmp_path):
    p = tmp_path / "image.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ConfigError, match=r"image\.png: not a UTF-8 text file .*expected JSON"):
        load_config(str(p))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trian'.*'train'"):
        load_config(write(tmp_path, {"trian": {}}))


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_blocks: expected an integer, got str"):
        load_config(write(tmp_path, {"model": {"num_blocks": "four"}}))
    with pytest.raises(ConfigError, match=r"model\.use_coords: expected true/false"):
        load_config(write(tmp_path, {"model": {"use_coords": "yes"}}))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.json"))


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "model": {\n    "num_blocks": 4,\n  }\n}')
    with pytest.raises(ConfigError, match=r"bad\.json:4:\d+: invalid JSON"):
        load_config(str(p))


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("kernels.mode=trition", r"kernels\.mode: 'trition' is not one of .*did you mean 'triton'"),
        ("deepspeed.optimizer.params.lr=0", r"lr: must be a number > 0"),
        ("deepspeed.optimizer.params.lr=-1e-3", r"lr: must be a number > 0"),
        ("deepspeed.train_micro_batch_size_per_gpu=0", r"train_micro_batch_size_per_gpu: must be a positive"),
        ("model.condition_pattern=[1,0]", r"condition_pattern: has 2 entries"),
        ("model.condition_method=film-bn", r"condition_method: 'film-bn' is not one of"),
        ("train.epochs=0", r"train\.epochs: must be > 0"),
        ("model.stem=features", r"data\.image_source: 'cache' does not fit model\.stem='features'"),
        ("train.epoch=3", r"^--set 'train\.epoch=3': unknown key 'epoch'.*'epochs'"),  # names the --set
        ("epochs=3", r"expected SECTION\.KEY=VALUE"),
    ],
)
def test_impossible_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/clevr.json", [override])


def test_overrides_and_kernels_flag():
    cfg = load_config(
        "configs/clevr.json",
        [
            "train.epochs=3",
            "model.condition_pattern=[1,0,1,1]",
            "deepspeed.bf16.enabled=true",
            "data.root=/x y",
        ],
        kernels="triton",
    )
    assert cfg.train.epochs == 3 and cfg.model.condition_pattern == [1, 0, 1, 1]
    assert cfg.deepspeed["bf16"]["enabled"] is True and cfg.data.root == "/x y"
    assert cfg.kernels.mode == "triton"


def test_cli_config_error_is_one_line(tmp_path, capsys):
    p = write(tmp_path, {"train": {"patiense": 3}})
    assert cli_main(["train", "--config", p]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "patiense" in err[0] and "patience" in err[0]


def test_roundtrip_to_dict(tmp_path):
    cfg = load_config("configs/synthetic.json")
    again = load_config(write(tmp_path, cfg.to_dict()))
    assert again.to_dict() == cfg.to_dict()


def test_readme_config_table_names_every_key_and_the_shipped_synthetic_lr():
    """The README's config table lists every key of the model, data and train sections, and its line on
    configs/synthetic.json gives the learning rate that file sets (it said 1e-3 while the file has 2e-3)."""
    import dataclasses
    import re
    from pathlib import Path

    from fastfilm.config import _SECTIONS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("model", "data", "train"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        missing = [f.name for f in dataclasses.fields(_SECTIONS[name]) if f"`{f.name}`" not in row]
        assert not missing, (name, missing)
    said = re.search(
        r"`configs/synthetic.json` \(small, for the synthetic set; it uses lr ([0-9.e-]+)", readme
    )
    assert said and float(said.group(1)) == load_config("configs/synthetic.json").lr


def test_every_command_line_option_has_help():
    """`fastfilm COMMAND --help` explains every option (synth's counts, eval --split, predict --top... had none)."""
    import argparse

    from fastfilm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {x.option_strings or x.dest}"
        for name, p in sub.choices.items()
        for x in p._actions
        if not x.help
    ]
    assert not bare, bare


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--config", "c.json", "--kernels", "foo"], "--kernels: invalid choice: 'foo'"),
        (["trian"], "invalid choice: 'trian'"),
        (["synth", "--out", "x", "--train-images", "abc"], "--train-images: invalid int value: 'abc'"),
        (["eval"], "required: --checkpoint"),
    ],
    ids=["bad-choice", "misspelled-command", "not-an-int", "missing-option"],
)
def test_command_line_mistakes_are_one_line(argv, expected, capsys):
    """argparse's own errors are one line too (they printed the usage block first)."""
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "--help" in err[0], err


def test_readme_gives_the_makefiles_torch_pin_and_how_to_get_the_cpu_build():
    """The README said the Makefile installs the CPU build; it installs `TORCH` from pip's indexes (PyPI's Linux
    wheels are CUDA builds) unless TORCH_INDEX names the CPU index: the README must say so, with the same pin."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    makefile, readme = (root / "Makefile").read_text(), (root / "README.md").read_text()
    pin = re.search(r"^TORCH \?= (\S+)$", makefile, re.M).group(1)
    index = re.search(r"^TORCH_INDEX \?=(.*)$", makefile, re.M).group(1).strip()
    assert f"`{pin}`" in readme
    if "whl/cpu" not in index:
        assert "make TORCH_INDEX=https://download.pytorch.org/whl/cpu" in readme
        assert "installs the **CPU** build" not in readme
