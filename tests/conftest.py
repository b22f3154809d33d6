"""Shared test fixtures. Triton runs in its interpreter when there is no GPU (must be set before `import triton`)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the same results with less interpreter overhead (interpreter_speed.py)
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_speed

    interpreter_speed.skip_repatching_in_kernels()
    interpreter_speed.skip_dead_overflow_checks()

# Under pytest-xdist (make test: one process per core) each process gets its share of the cores' threads: the
# same total as one process with all of them, without two processes' thread pools fighting over each core.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
