"""Data-layer fixtures: one tiny synthetic CLEVR set and its cache per test session (copied when a test edits)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SIZES = {"train_images": 12, "val_images": 6, "test_images": 4, "questions_per_image": 3}
IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> tuple[Path, dict]:
    """A synthetic CLEVR folder (12/6/4 images, 3 questions each, seed 0) and its generate() summary."""
    from fastfilm.data import synth

    root = tmp_path_factory.mktemp("synth") / "clevr"
    summary = synth.generate(str(root), seed=0, workers=2, **SIZES)
    return root, summary


@pytest.fixture(scope="session")
def cache(synth_set, tmp_path_factory) -> Path:
    """The prepared cache of `synth_set`, with a 32-pixel image cache (read-only for tests: copy to edit)."""
    from fastfilm.data import prep

    out = tmp_path_factory.mktemp("cache") / "cache"
    prep.prepare(str(synth_set[0]), str(out), image_size=IMAGE_SIZE, workers=2)
    return out


@pytest.fixture
def clevr_copy(synth_set, tmp_path) -> Path:
    """A private copy of the synthetic folder that a test may damage."""
    dst = tmp_path / "clevr"
    shutil.copytree(synth_set[0], dst)
    return dst
