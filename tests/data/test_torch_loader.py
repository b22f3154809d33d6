"""`data.loader: torch`: the same batches as the DALI loader for a seed, on every shard; the fallback where DALI
is not importable (one warning line)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fastfilm.data import build_loader

from .conftest import IMAGE_SIZE

KEYS = ("image", "question", "length", "answer", "family", "index")


def batches(cache, kind, *, split="train", epoch=1, start_question=0, **kw):
    kw.setdefault("image_size", IMAGE_SIZE)
    kw.setdefault("num_threads", 1)
    ld = build_loader(str(cache), split, kw.pop("batch_size", 4), loader=kind, **kw)
    return ld, [{k: v.clone() for k, v in b.items()} for b in ld.epoch(epoch, start_question=start_question)]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(KEYS)
        for k in KEYS:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            if k == "image":
                assert torch.allclose(x[k], y[k], atol=1e-6, rtol=0)
            else:
                assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize(
    "kw",
    [
        dict(shuffle=True, seed=3, drop_last=True, shard_id=1, num_shards=2),  # a training shard
        dict(shuffle=True, seed=0, drop_last=True, shard_id=0, num_shards=1, start_question=8),  # resumed
        dict(shuffle=False, drop_last=False, shard_id=1, num_shards=2, split="val", batch_size=3),  # eval, partial
        dict(shuffle=True, seed=1, drop_last=True, bucket_by_length=True),
    ],
)
def test_torch_loader_gives_the_dali_batches(cache, kw):
    pytest.importorskip("nvidia.dali")
    _, dali = batches(cache, "dali", **kw)
    ld, torch_ = batches(cache, "torch", **kw)
    assert type(ld).__name__ == "TorchLoader"
    assert_same(dali, torch_)


def test_torch_loader_png_source_matches_the_cache(cache, synth_set):
    _, from_cache = batches(cache, "torch", shuffle=True, seed=2, drop_last=True)
    _, from_png = batches(cache, "torch", shuffle=True, seed=2, drop_last=True, image_source="png", clevr_dir=str(synth_set[0]))
    assert_same(from_cache, from_png)  # PIL bicubic in the workers: the cache's own resize


def test_without_dali_loader_for_falls_back_to_torch_with_one_warning(cache, monkeypatch, capsys):
    from fastfilm.config import config_from_dict
    from fastfilm.data import loader as dali_loader
    from fastfilm.data.loader import loader_for

    cfg = config_from_dict(
        {
            "model": {"image_size": IMAGE_SIZE},
            "data": {"cache": str(cache), "num_threads": 1},
            "train": {"seed": 5},
            "deepspeed": {"train_micro_batch_size_per_gpu": 4},
        }
    )
    with_dali = None
    if dali_loader.dali_missing() is None:
        with_dali = [b["index"].clone() for b in loader_for(cfg, "train", train=True).epoch(0)]
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # DALI hidden: `import nvidia.dali` raises ImportError
    monkeypatch.setattr(dali_loader, "_warned", set())
    assert dali_loader.dali_missing() is not None
    with pytest.raises(ImportError, match="needs NVIDIA DALI"):
        build_loader(str(cache), "train", 4, image_size=IMAGE_SIZE)  # asked for DALI explicitly: the hint
    train = loader_for(cfg, "train", train=True)
    val = loader_for(cfg, "val", train=False)
    assert type(train).__name__ == type(val).__name__ == "TorchLoader"
    err = capsys.readouterr().err
    assert err.count("warning: NVIDIA DALI is not importable") == 1 and "data.loader=torch" in err
    got = [b["index"].clone() for b in train.epoch(0)]
    if with_dali is not None:  # the same questions, in the same order, for the seed
        assert len(got) == len(with_dali) and all(torch.equal(a, b) for a, b in zip(got, with_dali))
    rows = train.rows(0)
    assert np.array_equal(torch.cat(got).numpy(), rows)


def test_train_runs_without_dali_on_the_torch_loader(dataset, tmp_path, monkeypatch, capsys):
    from fastfilm.config import config_from_dict
    from fastfilm.data import loader as dali_loader
    from fastfilm.train import train

    from ..test_train import tiny_config

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setattr(dali_loader, "_warned", set())
    summary = train(config_from_dict(tiny_config(dataset, tmp_path / "run", epochs=1)))
    assert summary["epoch"] == 1 and summary["step"] == 48 // 8 and 0 <= summary["best_val_acc"] <= 1
    assert capsys.readouterr().err.count("warning: NVIDIA DALI is not importable") == 1
