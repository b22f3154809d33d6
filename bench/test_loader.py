"""The loaders alone (DALI and `data.loader: torch`, side by side): one epoch of the train split, from the uint8
image cache and from the PNGs.

The set is a tiny synthetic one in CLEVR's layout (480×320 RGBA PNGs), built once per session in a tmp dir
(`bench_dataset` in conftest.py). Each timed round is a whole epoch as the trainer gets it, including the
DALI pipeline that `Loader.epoch()` builds for the epoch; questions/s = questions in the epoch ÷ its time.
On a GPU the loader gets `device_id=0` (as the trainer). Without DALI installed its cases are skipped.
"""

from __future__ import annotations

import itertools

import benchlib
import pytest


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("source", ["cache", "png"])
def test_loader_epoch(benchmark, settings, bench_dataset, source, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: the DALI loader cannot run")
    from fastfilm.config import DataConfig
    from fastfilm.data import build_loader

    threads = DataConfig().num_threads
    loader = build_loader(
        bench_dataset["cache"],
        "train",
        bench_dataset["batch"],
        image_source=source,
        clevr_dir=bench_dataset["clevr"],
        image_size=bench_dataset["image_size"],
        shuffle=True,
        seed=0,
        drop_last=False,
        device_id=0 if settings.cuda else None,
        num_threads=threads,
        prefetch=DataConfig().prefetch,
        loader=kind,
    )
    epochs = itertools.count()
    s = bench_dataset["image_size"]

    def one_epoch() -> int:
        seen = 0
        for b in loader.epoch(next(epochs)):
            assert tuple(b["image"].shape[1:]) == (3, s, s)
            seen += b["answer"].numel()
        return seen

    assert one_epoch() == loader.num_questions  # every question once per epoch (drop_last=False)

    benchmark.group = f"loader/train split, image={s}, batch={bench_dataset['batch']}"
    benchmark.extra_info.update(
        {
            "kind": "loader",
            "impl": f"{kind}/{source}",
            "questions": loader.num_questions,
            "batches": len(loader),
            "image_size": s,
            "num_threads": threads,
            "loader": type(loader).__module__ + "." + type(loader).__name__,
            "pipeline": f"{'DALI' if kind == 'dali' else 'torch.utils.data'}, {'GPU (device_id=0)' if settings.cuda else 'CPU'}",
            "device": benchlib.device_name(),
        }
    )
    benchlib.run(benchmark, one_epoch, settings, warmup=1)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["questions_per_s"] = loader.num_questions / median
