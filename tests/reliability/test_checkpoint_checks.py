"""Checkpoint checks that need no training run: DeepSpeed's ZeRO classes allowed only where and when they belong,
a weights file that is not the whole model never renamed into place, ZeRO-3 and resume layouts refused in one line.
"""

import json
import os
import pickle

import pytest
import torch

from fastfilm.config import ConfigError, config_from_dict
from fastfilm.files import checkpoint as ckpt
from tests.reliability.test_safe_loading import Exploit
from tests.test_train import tiny_config

ZERO_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def zero_optim_states(extra=None):
    """What DeepSpeed 0.19's ZeRO-1/2 optimizer-state file holds (the classes; tensors made up)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    osd = {
        "loss_scaler": LossScaler(scale=1.0),
        "dynamic_loss_scale": False,
        "overflow": False,
        "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-3}]},
        "single_partition_of_fp32_groups": [torch.ones(4)],
        "zero_stage": ZeroStageEnum.optimizer_states,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
    }
    if extra is not None:
        osd["extra"] = extra
    return {"optimizer_state_dict": osd, "ds_version": "0.19.8"}


def zero_checkpoint(folder, name=ZERO_FILE, extra=None):
    os.makedirs(folder)
    torch.save({"module": {"w": torch.ones(4)}}, os.path.join(folder, "mp_rank_00_model_states.pt"))
    torch.save(zero_optim_states(extra), os.path.join(folder, name))
    ckpt.write_manifest(folder)
    return folder


def test_zero_optimizer_state_classes_are_allowed_in_their_files_only(tmp_path):
    ckpt.check_pickles(zero_checkpoint(str(tmp_path / "good")))
    ckpt.check_pickles(zero_checkpoint(str(tmp_path / "bf16"), name="bf16_" + ZERO_FILE))
    # The same objects in any other .pt file (e.g. the model states) are refused.
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_00_model_states\.pt: refused.*LossScaler"):
        ckpt.check_pickles(zero_checkpoint(str(tmp_path / "elsewhere"), name="mp_rank_00_model_states.pt"))


def test_crafted_pickle_inside_a_zero_optimizer_state_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = zero_checkpoint(str(tmp_path / "torch_save"), extra=Exploit(str(marker)))
    with pytest.raises(
        ckpt.CheckpointError, match=rf"{ZERO_FILE}: refused: not loadable with weights_only=True"
    ):
        ckpt.check_pickles(folder)
    folder = str(tmp_path / "raw")
    zero_checkpoint(folder)
    with open(os.path.join(folder, ZERO_FILE), "wb") as f:  # a plain pickle named like DeepSpeed's file
        pickle.dump(zero_optim_states(extra=Exploit(str(marker))), f, protocol=2)
    ckpt.write_manifest(folder)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.check_pickles(folder)
    assert not marker.exists()


def test_zero_classes_are_refused_outside_the_pinned_deepspeed_range(tmp_path, monkeypatch):
    import deepspeed

    folder = zero_checkpoint(str(tmp_path / "ckpt"))
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(ckpt.CheckpointError, match=r"LossScaler, allowed only with DeepSpeed >=0\.17,<0\.20"):
        ckpt.check_pickles(folder)
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    ckpt.check_pickles(folder)
    assert deepspeed.__version__.startswith("0.19")  # the range holds the installed version


def test_the_pinned_range_matches_setup_py():
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "setup.py"), encoding="utf-8").read()
    req = re.search(r'"deepspeed>=(\d+)\.(\d+)(?:,<(\d+)\.(\d+))?"', text)
    assert req, "setup.py: no deepspeed>=X.Y requirement"
    lo, hi = ckpt.DEEPSPEED_VERSIONS
    assert (int(req.group(1)), int(req.group(2))) == lo
    if req.group(3):  # an upper bound in setup.py must be the allow-list's
        assert (int(req.group(3)), int(req.group(4))) == hi


class Partitioned(torch.nn.Module):
    """Stands for a ZeRO-3 module: one parameter holds a local partition, its whole shape in `ds_shape`."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)
        self.lin.weight.data = torch.empty(0)
        self.lin.weight.ds_shape = torch.Size([2, 3])


class FakeEngine:
    def __init__(self, module):
        self.module = module

    def save_checkpoint(self, ckpt_dir, tag, save_latest=False):
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)


def test_expected_shapes_and_check_complete(tmp_path):
    m = Partitioned()
    shapes = ckpt.expected_shapes(m)
    assert shapes["lin.weight"] == (2, 3) and shapes["bn.num_batches_tracked"] == ()
    path = str(tmp_path / "w.safetensors")
    ckpt.atomic_save_safetensors(ckpt.model_state(m), path)
    with pytest.raises(ckpt.CheckpointError, match=r"not the whole model \(1 wrong shape: lin\.weight \[0\]"):
        ckpt.check_complete(path, shapes)
    whole = torch.nn.Linear(3, 2)
    ckpt.atomic_save_safetensors(ckpt.model_state(whole), path)
    ckpt.check_complete(path, ckpt.expected_shapes(whole))
    with pytest.raises(ckpt.CheckpointError, match=r"\(1 missing: extra\)"):
        ckpt.check_complete(path, {**ckpt.expected_shapes(whole), "extra": ()})
    with pytest.raises(ckpt.CheckpointError, match=r"\(1 not in the model: bias\)"):
        ckpt.check_complete(path, {"weight": (2, 3)})
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable weights file"):
        ckpt.check_complete(str(tmp_path / "none.safetensors"), {"weight": (2, 3)})


def test_a_partial_model_is_never_renamed_into_place(dataset, tmp_path):
    cfg = config_from_dict(tiny_config(dataset, tmp_path / "run"))
    ckpt_dir = str(tmp_path / "run" / "checkpoints")
    good = ckpt.save(FakeEngine(torch.nn.Linear(3, 2)), ckpt_dir, "last", {"step": 1}, cfg, {})
    before = {n: open(os.path.join(good, n), "rb").read() for n in os.listdir(good)}
    with pytest.raises(ckpt.CheckpointError, match=r"not the whole model.*previous one is kept"):
        ckpt.save(FakeEngine(Partitioned()), ckpt_dir, "last", {"step": 2}, cfg, {})
    assert sorted(os.listdir(ckpt_dir)) == ["last"]
    assert {n: open(os.path.join(good, n), "rb").read() for n in os.listdir(good)} == before
    assert json.load(open(os.path.join(good, "layout.json")))["world_size"] == 1


def test_zero_stage_3_is_refused_with_what_to_use(dataset, tmp_path):
    for stage, match in ((3, "stage=3 is not supported.*use stage 1 or 2"), (4, "must be 0, 1 or 2, got 4")):
        raw = tiny_config(dataset, tmp_path / "z")
        raw["deepspeed"]["zero_optimization"] = {"stage": stage}
        with pytest.raises(ConfigError, match=match):
            ckpt.check_zero_stage(config_from_dict(raw))
    for stage in (0, 1, 2):
        raw["deepspeed"]["zero_optimization"] = {"stage": stage}
        ckpt.check_zero_stage(config_from_dict(raw))


class LayoutEngine:
    def __init__(self, stage):
        self.stage = stage

    def zero_optimization_stage(self):
        return self.stage


def test_resume_layouts_deepspeed_cannot_load_are_refused(tmp_path):
    folder = str(tmp_path)
    ckpt.check_layout(folder, LayoutEngine(1))  # no layout.json: an older checkpoint, not checked
    layout = {"world_size": 2, "micro_batch": 8, "gradient_accumulation_steps": 1, "global_batch": 16}
    ckpt.atomic_write_json(os.path.join(folder, "layout.json"), dict(layout, zero_stage=1))
    with pytest.raises(
        ckpt.CheckpointError, match=r"written by 2 rank\(s\) under ZeRO stage 1.*resume it on 2"
    ):
        ckpt.check_layout(folder, LayoutEngine(1))  # this process is a world of one
    with pytest.raises(ckpt.CheckpointError, match=r"zero_optimization.stage=1, this run has stage=2"):
        ckpt.check_layout(folder, LayoutEngine(2))
    ckpt.atomic_write_json(os.path.join(folder, "layout.json"), dict(layout, zero_stage=0))
    ckpt.check_layout(folder, LayoutEngine(0))  # stage 0: any number of ranks


def test_the_training_script_refuses_stage_3_before_any_work(dataset, tmp_path, capsys):
    from fastfilm.train import main

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_config(dataset, tmp_path / "run")))
    status = main(["--config", str(cfg), "--set", "deepspeed.zero_optimization.stage=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("fastfilm: config error: ") and "stage=3 is not supported" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed
