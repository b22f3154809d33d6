"""Shared test fixtures. Triton runs in its interpreter when there is no GPU (must be set before `import triton`)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A tiny synthetic CLEVR-format set (16/6/2 images, 3 questions each) and its cache with 32×32 images."""
    from fastfilm.data import prep, synth

    d = tmp_path_factory.mktemp("trainset")
    synth.generate(
        str(d / "clevr"),
        train_images=16,
        val_images=6,
        test_images=2,
        questions_per_image=3,
        seed=0,
        workers=1,
    )
    prep.prepare(str(d / "clevr"), str(d / "cache"), image_size=32, workers=1)
    return d
