"""`fastfilm features` (ResNet-101 through layer3, random weights, tiny images) and `prep --features-h5`."""

import os
import tracemalloc

import h5py  # a dependency (setup.py install_requires)
import numpy as np
import pytest
import torch

from fastfilm.data import DataError, feature_files
from fastfilm.files import features


def test_trunk_is_resnet101_through_layer3():
    trunk = features.ResNetTrunk()
    # ResNet-101 has 44,549,160 parameters; layer4 14,964,736 and fc 2,049,000 are not part of the trunk.
    assert sum(p.numel() for p in trunk.parameters()) == 44_549_160 - 14_964_736 - 2_049_000
    assert [len(trunk.layer1), len(trunk.layer2), len(trunk.layer3)] == [3, 4, 23]
    with torch.no_grad():
        assert trunk.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1024, 4, 4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random ResNet-101 weights saved as torchvision would (a state dict with layer4 and fc too)."""
    torch.manual_seed(0)
    trunk = features.ResNetTrunk()
    sd = trunk.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 2.0)
    sd["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    path = str(tmp_path_factory.mktemp("w") / "resnet101.pth")
    torch.save(sd, path)
    return path, trunk.eval()


def test_features_command_writes_what_the_feature_loader_reads(dataset, tmp_path, weights):
    from fastfilm.cli import main
    from fastfilm.data import build_loader, prep

    root = str(dataset / "clevr")
    cache = str(tmp_path / "cache")
    prep.prepare(root, cache, splits=["train", "val"], workers=1)
    args = [
        "features",
        "--clevr",
        root,
        "--out",
        cache,
        "--weights",
        weights[0],
        "--splits",
        "val",
        "--image-size",
        "32",
        "--batch-size",
        "4",
    ]
    assert main(args) == 0
    out = np.load(os.path.join(cache, "val_features.npy"), mmap_mode="r")
    n_images = len(os.listdir(os.path.join(root, "images", "val")))
    assert out.dtype == np.float32 and out.shape == (n_images, 1024, 2, 2)
    # Row i is image i, as the original's preprocessing + network computes it.
    x = features.preprocess(os.path.join(root, "images", "val", "CLEVR_val_000003.png"), 32)
    with torch.no_grad():
        ref = weights[1](torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(out[3], ref, rtol=1e-4, atol=1e-4)
    # The feature model's loader reads it: [B, 1024, 2, 2] float32 batches.
    loader = build_loader(cache, "val", 4, image_source="features", shuffle=False, num_threads=1)
    batch = next(iter(loader.epoch(0)))
    assert batch["image"].shape == (4, 1024, 2, 2) and batch["image"].dtype == torch.float32


def test_preprocess_is_the_originals():
    assert features.STD == (0.229, 0.224, 0.224)  # the original's (blue std 0.224, not 0.225)
    assert features.MEAN == (0.485, 0.456, 0.406)


def test_weights_that_need_unpickling_or_are_not_resnet_are_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"conv1.weight": Exploit()}, str(tmp_path / "bad.pth"))
    with pytest.raises(DataError, match="refused"):
        features.load_trunk(str(tmp_path / "bad.pth"))
    assert not (tmp_path / "pwned").exists()
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "small.pth"))
    with pytest.raises(DataError, match="trunk keys missing"):
        features.load_trunk(str(tmp_path / "small.pth"))


def test_h5_conversion_reads_in_bounded_chunks(tmp_path):
    n, shape = 64, (16, 8, 8)  # 64 rows of 4 KiB: a 256 KiB file
    data = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)
    h5 = str(tmp_path / "val_features.h5")
    with h5py.File(h5, "w") as f:
        f.create_dataset("features", data=data)
    out = str(tmp_path / "val_features.npy")
    tracemalloc.start()
    feature_files.convert_features_h5(h5, out, chunk_bytes=16 << 10)  # 4 rows per read
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < data.nbytes / 4, peak  # never the whole file (nor a large part of it) in memory
    got = np.load(out, mmap_mode="r")
    assert got.dtype == np.float32 and np.array_equal(got, data)


def test_prep_features_h5_option(dataset, tmp_path, capsys):
    from fastfilm.cli import main

    data = np.ones((3, 4, 2, 2), np.float32)
    h5 = str(tmp_path / "val_features.h5")
    with h5py.File(h5, "w") as f:
        f.create_dataset("features", data=data)
    cache = str(tmp_path / "cache")
    args = [
        "prep",
        "--clevr",
        str(dataset / "clevr"),
        "--out",
        cache,
        "--splits",
        "train,val",
        "--workers",
        "1",
    ]
    assert main([*args, "--features-h5", h5, "--features-h5", f"valB={h5}"]) == 0
    assert np.array_equal(np.load(os.path.join(cache, "val_features.npy")), data)
    assert os.path.isfile(os.path.join(cache, "valB_features.npy"))
    with h5py.File(str(tmp_path / "x.h5"), "w") as f:
        f.create_dataset("other", data=data)
    with pytest.raises(DataError, match="no dataset 'features'"):
        feature_files.convert_features_h5(str(tmp_path / "x.h5"), str(tmp_path / "x.npy"))
    with pytest.raises(DataError, match="name the split"):
        feature_files.h5_split(str(tmp_path / "x.h5"))
