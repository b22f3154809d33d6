"""fastfilm against the original FiLM code (github.com/ethanjperez/film), same machine, same process.

    pytest bench/test_original.py --original-film PATH [--benchmark-json FILE]

PATH is a checkout of the original (never vendored; `bench/original_film.py` loads it). Without it every case
is skipped, and the report lists why.

- `test_logits_equal_the_original`: the paper's configs (configs/clevr.json, configs/clevr_features.json, full
  size), the same weights (`to_original_state_dict`), float64, eval and train mode: fastfilm's logits equal the
  original's to 1e-9 (fastfilm packs the questions; the original runs its GRU over the padding).
- `test_train_step_vs_original`: the paper's raw-pixel model, one optimizer step (forward, cross-entropy,
  backward, Adam) at batch 8 on questions of 10-38 tokens padded to 40 (DESIGN.md §7's setup): the original in
  float32, fastfilm `reference` in float32 and under bf16 autocast. The report prints "× the original".
"""

from __future__ import annotations

import gc
import os

import benchlib
import pytest
import torch
import torch.nn.functional as F
import workload

V, A = benchlib.PAPER_VOCAB, benchlib.PAPER_ANSWERS
SETUP = "paper pixels, batch 8, 10-38 tokens padded to 40"


@pytest.fixture(scope="module")
def original_path(request) -> str:
    path = request.config.getoption("--original-film")
    if not path:
        pytest.skip("no --original-film PATH (a checkout of github.com/ethanjperez/film)")
    import original_film

    original_film.load(path)  # a clear error now if PATH is not a checkout
    return path


def questions(n: int, t: int, lo: int, hi: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """<START> w… <END> <NULL>…: lengths drawn in [lo, hi], padded to t."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    q = torch.randint(4, V, (n, t), generator=g)
    q[:, 0] = 1
    for i, length in enumerate(lengths.tolist()):
        q[i, length - 1] = 2
        q[i, length:] = 0
    return q, lengths


@pytest.mark.parametrize("config", ["clevr.json", "clevr_features.json"])
def test_logits_equal_the_original(original_path, config):
    import original_film

    from fastfilm.config import load_config
    from fastfilm.model import FiLMModel

    cfg = load_config(os.path.join(benchlib.ROOT, "configs", config)).model
    torch.manual_seed(0)
    ours = FiLMModel(cfg, V, A).double()
    original_film.set_device_dtype("cpu", torch.float64)
    gen, net = original_film.build(original_path, cfg, V, A)
    original_film.load_weights(gen, net, ours)
    q, lengths = questions(3, workload.CLEVR_PADDED_TOKENS, 4, 45)
    lengths[0] = 2  # the shortest possible question next to long ones
    q[0, 1], q[0, 2:] = 2, 0
    g = torch.Generator().manual_seed(1)
    if cfg.stem == "pixels":
        images = torch.rand(3, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)
    else:
        images = torch.randn(
            3, cfg.feature_channels, cfg.feature_size, cfg.feature_size, generator=g
        ).double()
    with torch.no_grad():
        for train in (False, True):
            ours.train(train), gen.train(train), net.train(train)
            expected = original_film.logits(gen, net, images, q)
            torch.testing.assert_close(ours(images, q, lengths), expected, rtol=0, atol=1e-9)


def _paper_cfg():
    return benchlib.paper_config(("deepspeed.train_micro_batch_size_per_gpu=8",))


@pytest.mark.parametrize("code", ["original-fp32", "fastfilm-fp32", "fastfilm-bf16"])
def test_train_step_vs_original(benchmark, settings, original_path, code):
    cfg = _paper_cfg()
    n = 8
    q, lengths = questions(n, 40, 10, 38)
    g = torch.Generator().manual_seed(2)
    dev = benchlib.device()
    images = torch.rand(n, 3, cfg.model.image_size, cfg.model.image_size, generator=g).to(dev)
    answers = torch.randint(4, A, (n,), generator=g).to(dev)
    q = q.to(dev)
    impl, dtype = code.split("-")
    if impl == "original":
        import original_film

        original_film.set_device_dtype(dev, torch.float32)
        torch.manual_seed(0)
        gen, net = original_film.build(original_path, cfg.model, V, A)
        gen.train(), net.train()
        # scripts/train_model.py: one Adam per model, lr 3e-4, weight decay 1e-5 (coupled L2).
        opts = [torch.optim.Adam(m.parameters(), lr=3e-4, weight_decay=1e-5) for m in (gen, net)]

        def step():
            for o in opts:
                o.zero_grad()
            loss = F.cross_entropy(original_film.logits(gen, net, images, q), answers)
            loss.backward()
            for o in opts:
                o.step()
            return loss

    else:
        engine = benchlib.build_engine(cfg, "reference", benchlib.DTYPES[dtype] if dtype != "fp32" else None)
        batch = {"image": images, "question": q, "length": lengths, "answer": answers}
        step = benchlib.make_train_step(engine, batch)
        benchmark.extra_info["gflop_per_step"] = workload.step_gflop(cfg.model, lengths, q.shape[1])

    assert torch.isfinite(step()).item()
    benchmark.group = f"original/{SETUP}"
    benchmark.extra_info.update(
        kind="original",
        impl=code,
        dtype=dtype,
        setup=SETUP,
        batch=n,
        question_len=q.shape[1],
        device=benchlib.device_name(),
    )
    benchlib.run(benchmark, step, settings)
    median = benchlib.median_seconds(benchmark)
    if median:
        benchmark.extra_info["questions_per_s"] = n / median
        if "gflop_per_step" in benchmark.extra_info:
            benchmark.extra_info["gflop_per_s"] = benchmark.extra_info["gflop_per_step"] / median
    del step
    gc.collect()
