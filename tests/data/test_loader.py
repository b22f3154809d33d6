"""The DALI loader on CPU: sharding, epoch order, per-batch padding, cache vs PNG images, resume, features."""

from __future__ import annotations

import builtins
import shutil

import numpy as np
import pytest
import torch

from fastfilm.data import DataError, build_loader, load_split
from fastfilm.data.loader import Loader

from .conftest import IMAGE_SIZE

KEYS = ("image", "question", "length", "answer", "family", "index")


def collect(loader: Loader, epoch: int = 0, start_batch: int = 0) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for b in loader.epoch(epoch, start_batch)]


def loader(cache, split="val", batch_size=4, **kw) -> Loader:
    kw.setdefault("image_size", IMAGE_SIZE)
    kw.setdefault("num_threads", 1)
    return build_loader(str(cache), split, batch_size, **kw)


def test_batch_contents_match_the_cache(cache):
    a = load_split(str(cache), "val")
    images = np.load(cache / f"val_images_{IMAGE_SIZE}.npy")
    ld = loader(cache, shuffle=False)
    batches = collect(ld)
    assert len(batches) == len(ld) == 5 and ld.num_questions == 18
    for b in batches:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        for k in KEYS[1:]:
            assert b[k].dtype == torch.int64
        rows = b["index"].numpy()
        length = int(b["length"].max())
        assert b["question"].shape == (len(rows), length)  # padded to this batch's longest question
        assert np.array_equal(b["question"].numpy(), a["questions"][rows, :length])
        assert np.array_equal(b["length"].numpy(), a["lengths"][rows])
        assert np.array_equal(b["answer"].numpy(), a["answers"][rows])
        assert np.array_equal(b["family"].numpy(), a["family"][rows])
        ref = images[a["image_index"][rows]].transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # CHW, /255
        assert np.allclose(b["image"].numpy(), ref, atol=1e-6)
    assert [len(b["index"]) for b in batches] == [4, 4, 4, 4, 2]  # last batch partial
    assert any(b["question"].shape[1] < a["questions"].shape[1] for b in batches)


def test_eval_shards_cover_the_split_exactly_once(cache):
    total = len(load_split(str(cache), "val")["answers"])
    seen = []
    for shard in (0, 1):
        ld = loader(cache, batch_size=4, shard_id=shard, num_shards=2, shuffle=False, drop_last=False)
        batches = collect(ld)
        assert len(batches) == len(ld)
        got = [int(i) for b in batches for i in b["index"]]
        assert len(got) == ld.num_questions
        seen += got
    assert sorted(seen) == list(range(total))  # union is the split, once each (18 = 9 + 9: batches 4,4,1)


def test_eval_shards_with_uneven_sizes(cache):
    """train has 36 questions; 5 shards of batch 3 get 7 or 8 questions each, nothing dropped."""
    seen = []
    for shard in range(5):
        ld = loader(cache, "train", batch_size=3, shard_id=shard, num_shards=5, shuffle=True, seed=4)
        got = [int(i) for b in collect(ld, epoch=2) for i in b["index"]]
        assert len(got) == ld.num_questions and len(ld) == -(-len(got) // 3)
        seen += got
    assert sorted(seen) == list(range(36))


def test_training_shards_run_equal_steps_without_duplicates(cache):
    total = len(load_split(str(cache), "train")["answers"])  # 36
    runs = []
    for shard in (0, 1):
        ld = loader(
            cache, "train", batch_size=5, shard_id=shard, num_shards=2, shuffle=True, seed=1, drop_last=True
        )
        batches = collect(ld, epoch=3)
        assert len(batches) == len(ld) == total // (5 * 2)  # 3 steps on every rank
        assert all(len(b["index"]) == 5 for b in batches)
        runs.append([int(i) for b in batches for i in b["index"]])
    assert not set(runs[0]) & set(runs[1]) and len(set(runs[0])) == len(runs[0]) == 15


def test_epoch_order_is_a_seeded_permutation(cache):
    def order(seed, epoch):
        return [
            int(i)
            for b in collect(loader(cache, "train", batch_size=8, seed=seed), epoch)
            for i in b["index"]
        ]

    e0 = order(0, 0)
    assert sorted(e0) == list(range(36)) and e0 != list(range(36))
    assert order(0, 0) == e0 and order(0, 1) != e0 and order(1, 0) != e0
    assert [
        int(i) for b in collect(loader(cache, "train", batch_size=8, shuffle=False)) for i in b["index"]
    ] == list(range(36))


@pytest.mark.parametrize("drop_last,start", [(False, 2), (True, 1), (False, 0), (False, 9)])
def test_start_batch_resumes_without_reading_skipped_batches(cache, monkeypatch, drop_last, start):
    ld = loader(cache, "train", batch_size=5, seed=2, drop_last=drop_last)
    full = collect(ld, epoch=1)
    read = []
    real = Loader.read_images
    monkeypatch.setattr(Loader, "read_images", lambda self, idx: read.append(len(idx)) or real(self, idx))
    resumed = collect(ld, epoch=1, start_batch=start)
    assert len(resumed) == max(0, len(full) - start)
    for a, b in zip(full[start:], resumed):
        for k in KEYS:
            assert torch.equal(a[k], b[k])
    assert sum(read) == sum(len(b["index"]) for b in resumed)  # skipped batches were never read


def test_png_path_matches_the_cache_path(synth_set, cache):
    """Same questions, same order; images within tolerance.

    The cache holds PIL bicubic resizes (the original's `imresize`), the PNG path resizes with DALI's cubic
    filter (antialiased): both are cubic convolutions but PIL rounds its filter weights to fixed point and
    clamps per pass. Measured on real CLEVR images at 224/128/64/32 px: mean |Δ| ≤ 0.15/255, max 9/255; on
    synthetic ones mean ≤ 0.04/255, max 2/255. The bounds below (mean 1/255, max 16/255) allow for that, and
    still fail for a wrong image, wrong channel order, missing /255, or a non-antialiased resize (mean ≥ 2/255).
    """
    kw = {"batch_size": 4, "shuffle": True, "seed": 5}
    from_cache = collect(loader(cache, **kw))
    from_png = collect(loader(cache, image_source="png", clevr_dir=str(synth_set[0]), **kw))
    assert len(from_cache) == len(from_png)
    for a, b in zip(from_cache, from_png):
        for k in KEYS[1:]:
            assert torch.equal(a[k], b[k])
        diff = (a["image"] - b["image"]).abs()
        assert diff.mean() < 1 / 255 and diff.max() < 16 / 255
        assert b["image"].min() >= 0 and b["image"].max() <= 1


def test_png_path_finds_the_clevr_folder_in_the_manifest(cache):
    b = next(iter(loader(cache, image_source="png", shuffle=False).epoch(0)))
    assert b["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_png_path_names_a_bad_file(synth_set, cache, tmp_path):
    root = tmp_path / "clevr"
    shutil.copytree(synth_set[0], root)
    bad = root / "images" / "val" / "CLEVR_val_000003.png"
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated: the header is fine, DALI's decoder fails
    with pytest.raises(DataError, match=r"CLEVR_val_000003\.png: cannot decode"):
        collect(loader(cache, image_source="png", clevr_dir=str(root), shuffle=False))
    bad.write_bytes(b"")
    with pytest.raises(DataError, match=r"CLEVR_val_000003\.png: zero-byte file"):
        collect(loader(cache, image_source="png", clevr_dir=str(root), shuffle=False))


def test_features_source(cache, tmp_path):
    c = tmp_path / "cache"
    shutil.copytree(cache, c)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((6, 16, 14, 14)).astype(np.float16)
    np.save(c / "val_features.npy", feats)
    a = load_split(str(c), "val")
    for b in collect(loader(c, image_source="features", batch_size=5)):
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (16, 14, 14)
        ref = feats[a["image_index"][b["index"].numpy()]].astype(np.float32)
        assert np.array_equal(b["image"].numpy(), ref)


def test_features_that_do_not_fit_the_feature_stem_are_a_data_error(cache, tmp_path):
    """loader_for (train, eval, analyze): features [16, 14, 14] under a model reading [1024, 14, 14] name the
    file and both shapes (was a conv2d channel error at the first batch, after set-up)."""
    from fastfilm.config import config_from_dict
    from fastfilm.data.loader import loader_for

    c = tmp_path / "cache"
    shutil.copytree(cache, c)
    np.save(c / "val_features.npy", np.zeros((6, 16, 14, 14), np.float16))
    raw = {"model": {"stem": "features"}, "data": {"cache": str(c), "image_source": "features"}}
    with pytest.raises(
        DataError, match=r"val_features\.npy: features of shape \[16, 14, 14\], .* \[1024, 14, 14\]"
    ):
        loader_for(config_from_dict(raw), "val", train=False)
    raw["model"]["feature_channels"] = 16
    assert loader_for(config_from_dict(raw), "val", train=False).total == 18


def test_test_split_has_no_answers(cache):
    batches = collect(loader(cache, "test", batch_size=5))
    assert sum(len(b["answer"]) for b in batches) == 12
    assert all((b["answer"] == -1).all() for b in batches)


def test_errors(cache, tmp_path):
    with pytest.raises(DataError, match=r"val_images_48\.npy: no 48px image cache"):
        loader(cache, image_size=48)
    with pytest.raises(DataError, match=r"val_features\.npy: not found"):
        loader(cache, image_source="features")
    with pytest.raises(DataError, match=r"vocab\.json: not found"):
        loader(tmp_path)
    with pytest.raises(ValueError, match="shard_id"):
        loader(cache, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="image_source"):
        loader(cache, image_source="jpeg")
    with pytest.raises(ValueError, match="batch_size"):
        loader(cache, batch_size=0)
    assert list(loader(cache).epoch(0, start_batch=99)) == []
    big = loader(cache, "val", batch_size=64, drop_last=True)
    assert len(big) == 0 and big.num_questions == 0 and list(big.epoch(0)) == []


def test_without_dali_the_error_says_how_to_install(cache, monkeypatch):
    real_import = builtins.__import__

    def no_dali(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(ImportError, match=r"pip install nvidia-dali-cuda130"):
        loader(cache)


def test_vocab_sizes_for_the_trainer(cache):
    from fastfilm.data import load_vocab

    ld = loader(cache)
    v = load_vocab(str(cache))
    assert ld.vocab == v
    batches = collect(ld)
    assert max(int(b["question"].max()) for b in batches) < len(v["question_token_to_idx"])
    assert max(int(b["answer"].max()) for b in batches) < len(v["answer_token_to_idx"])
