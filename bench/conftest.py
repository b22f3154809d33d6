"""pytest-benchmark suites of fastfilm: `pytest bench/` (full), `pytest bench/ --bench-quick` (`make test`).

Groups (one pytest-benchmark table each, implementations side by side):
  op/…          the fused ResBlock op `kernels.bn_film_relu`, forward and forward+backward, GB/s in extra_info
  train_step/…  one optimizer step of the raw-pixel model per kernels mode (questions/s)
  generator/…   the GRU FiLM generator alone (its share of the step is in the report)
  inference/…   the model's eval forward per autocast precision (what `--precision auto` chooses between)
  loader/…      the loaders alone (DALI and torch.utils.data), uint8 cache vs PNG decoding (questions/s)

On a GPU: the paper's sizes, a timer that synchronises, warm-up rounds. Without one: small shapes, the numbers
are only a shape-check, and cases that would run in the Triton interpreter are collected but skipped
("Triton interpreter: not a timing") unless `--bench-include-interpreter` is given.
`python bench/report.py results.json -o bench/RESULTS.md` turns `--benchmark-json` output into tables.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):  # `fastfilm`, `kernels` and `benchlib` importable from a plain checkout
    if _p not in sys.path:
        sys.path.insert(0, _p)

import benchlib  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # the tests' interpreter shortcuts (same results, less overhead): the CPU cases that run Triton kernels
    # (gpu_step's kernel pick) are shape-checks, and take ~half the time with them
    from tests import interpreter_speed  # noqa: E402

    interpreter_speed.install()

if not benchlib.CUDA:
    # One intra-op thread on a CPU: with 2 OpenMP threads on a shared 2-core machine, one descheduled thread
    # stalls every parallel region for milliseconds and the shape-check numbers swing 100×.
    # FASTFILM_BENCH_CPU_THREADS overrides it.
    torch.set_num_threads(int(os.environ.get("FASTFILM_BENCH_CPU_THREADS", "1")))


def pytest_addoption(parser):
    group = parser.getgroup("fastfilm-bench", "fastfilm benchmarks (bench/)")
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="fewest sizes and rounds: a fast, green shape-check of the whole harness (make test)",
    )
    group.addoption(
        "--bench-include-interpreter",
        action="store_true",
        default=False,
        help="also time the Triton cases on a CPU, in the Triton interpreter (very slow, not a real timing)",
    )
    _add_workload_options(group)


def _settings(config) -> benchlib.Settings:
    return benchlib.Settings(
        cuda=benchlib.CUDA,
        quick=bool(config.getoption("--bench-quick")),
        include_interpreter=bool(config.getoption("--bench-include-interpreter")),
    )


@pytest.fixture(scope="session")
def settings(request) -> benchlib.Settings:
    return _settings(request.config)


def pytest_generate_tests(metafunc):
    """Sizes depend on the device and on --bench-quick: the op benchmarks get their N from here."""
    if "op_n" in metafunc.fixturenames:
        ns = _settings(metafunc.config).op_ns
        metafunc.parametrize("op_n", ns, ids=[f"N{n}" for n in ns])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.bench)


# ------------------------------------------------------------------------------- what goes into the JSON
_SKIPPED: list[dict[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_machine_info(config, machine_info):
    s = _settings(config)
    machine_info["fastfilm"] = {
        "device": benchlib.device_name(),
        "device_type": "cuda" if s.cuda else "cpu",
        "quick": s.quick,
        "include_interpreter": s.include_interpreter,
        **benchlib.versions(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastfilm_skipped"] = list(_SKIPPED)


# ----------------------------------------------------------------------------------------- shared data
@pytest.fixture(scope="session")
def bench_dataset(tmp_path_factory, settings):
    """A tiny synthetic CLEVR-format set (PNGs + questions) and its cache with uint8 images, once a session."""
    import inspect

    from fastfilm.data import prep, synth

    spec = settings.loader_set
    root = tmp_path_factory.mktemp("bench_data")
    workers = {} if settings.cuda else {"workers": 1}
    gen_kw = {k: v for k, v in workers.items() if k in inspect.signature(synth.generate).parameters}
    synth.generate(
        str(root / "clevr"),
        train_images=spec["train_images"],
        val_images=2,
        test_images=1,
        questions_per_image=spec["questions_per_image"],
        seed=0,
        **gen_kw,
    )
    prep_kw = {k: v for k, v in workers.items() if k in inspect.signature(prep.prepare).parameters}
    prep.prepare(str(root / "clevr"), str(root / "cache"), image_size=spec["image_size"], **prep_kw)
    return {"clevr": str(root / "clevr"), "cache": str(root / "cache"), **spec}


def _add_workload_options(group) -> None:
    """Options of the workload and original-code benchmarks (bench/test_flops.py, bench/test_original.py)."""
    group.addoption(
        "--bench-lengths",
        default=None,
        metavar="CACHE",
        help="a CLEVR `fastfilm prep` cache: FLOPs per question at its train split's real length distribution",
    )
    group.addoption(
        "--original-film",
        default=os.environ.get("FASTFILM_ORIGINAL_FILM"),
        metavar="PATH",
        help="a checkout of the original FiLM code (github.com/ethanjperez/film, never vendored): compare "
        "logits and train-step speed with it in the same run (also FASTFILM_ORIGINAL_FILM)",
    )
