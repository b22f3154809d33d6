"""Shared test fixtures. Triton runs in its interpreter when there is no GPU (must be set before `import triton`)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the same results with less interpreter overhead (interpreter_speed.py)
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_speed

    interpreter_speed.install()

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


# make test runs the files in TEST_JOBS processes, one file at a time each (pytest-xdist --dist loadfile), handing
# files out in collection order: the longest first (test time measured on 2 AVX2 cores), so that the last files
# handed out are short ones and the processes finish together, instead of one running a 30-60 s file alone at the
# end. The other files keep their order after these; the order within a file is unchanged.
LONGEST_FIRST = (
    "tests/reliability/test_faults.py",
    "tests/kernels/test_bn_film_relu.py",
    "tests/kernels/test_gpu_choices.py",
    "tests/kernels/test_aot.py",
    "tests/kernels/test_model_parity.py",
    "tests/reliability/test_distributed.py",
    "tests/reliability/test_zero.py",
    "tests/test_trainer_parts.py",
    "tests/reliability/test_run_folder.py",
    "tests/test_train_schedule.py",
    "tests/reliability/test_schedule_two_ranks.py",
    "tests/test_graphed.py",
    "tests/kernels/test_conv_coords.py",
    "tests/test_kernel_pick.py",
    "tests/reliability/test_bad_usage.py",
    "tests/reliability/test_fuzz_config.py",
)


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FIRST), the rest after them in their own order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
