"""bench/roofline.py's floor counts what the model does: its convolution FLOPs equal torch's FlopCounterMode's, the
question RNN's recurrent steps read the hidden weights once per time step and direction, and the floor moves the way
the work does (padding, batch, bandwidth). Counts on the meta device, no timing."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paper():
    from fastfilm.config import load_config

    return load_config(os.path.join(ROOT, "configs", "clevr.json")).model


def _parts(rows):
    return {r.part: r for r in rows}


def test_convolution_flops_equal_torchs_count(paper):
    import roofline
    from torch.utils.flop_counter import FlopCounterMode

    from fastfilm.model import FiLMModel

    n, lengths = 4, [46, 30, 12, 9]
    with torch.device("meta"):
        model = FiLMModel(paper, 93, 32).train()
    with FlopCounterMode(display=False) as counter:
        logits = model(
            torch.empty(n, 3, 224, 224, device="meta"),
            torch.ones(n, 46, dtype=torch.long, device="meta"),
            torch.tensor(lengths),
        )
        F.cross_entropy(logits.float(), torch.zeros(n, dtype=torch.long, device="meta")).backward()
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    torch_conv = ops["aten.convolution"] + ops["aten.convolution_backward"]
    rows = _parts(roofline.step_floor(paper, lengths))
    ours = sum(r.gflop for name, r in rows.items() if name.endswith("convolutions")) * 1e9
    assert ours == pytest.approx(torch_conv, rel=1e-9)


def test_the_rnn_reads_its_hidden_weights_every_step(paper):
    import roofline

    n, t, h = 64, 46, paper.rnn_hidden_dim
    rows = _parts(roofline.step_floor(paper, [t] * n, matmul_tflops=790, hbm_tbps=4.8))
    rec = rows["question RNN: recurrent steps"]
    w_hh = 3 * h * h * 2  # fp16
    states = n * (h + 3 * h) * 2
    assert rec.gbyte * 1e9 == pytest.approx(2 * t * (w_hh + states))
    assert rec.gflop * 1e9 == pytest.approx(2 * t * 2 * n * 3 * h * h)
    per_step = max(2 * n * 3 * h * h / 790e12, (w_hh + states) / 4.8e12)
    assert rec.ms == pytest.approx(2 * t * per_step * 1e3)
    assert rec.bound == "memory"  # batch 64: the weight reads bound each step
    big = _parts(roofline.step_floor(paper, [t] * 256, matmul_tflops=790, hbm_tbps=4.8))
    assert big["question RNN: recurrent steps"].bound == "compute"
    # model.rnn_autocast false: float32 weights and states, the products at the TF32 peak; no weight casts
    fp32 = _parts(
        roofline.step_floor(paper, [t] * n, matmul_tflops=790, hbm_tbps=4.8, rnn_bytes=4, rnn_tflops=400)
    )
    rec32 = fp32["question RNN: recurrent steps"]
    assert rec32.gbyte * 1e9 == pytest.approx(2 * t * 2 * (w_hh + states))
    assert rec32.ms == pytest.approx(
        2 * t * max(2 * n * 3 * h * h / 400e12, 2 * (w_hh + states) / 4.8e12) * 1e3
    )
    opt = "optimizer (fused Adam), weight casts, gradients"
    rnn_params = 3 * h * (paper.wordvec_dim + h + 2)
    assert (rows[opt].gbyte - fp32[opt].gbyte) * 1e9 == pytest.approx(12 * rnn_params)
    full = _parts(
        roofline.step_floor(paper, [t] * n, act_bytes=4, rnn_bytes=4)
    )  # no autocast: no casts at all
    params = rnn_params + (rows[opt].gbyte * 1e9 - 52 * rnn_params) / 52
    assert full[opt].gbyte * 1e9 == pytest.approx(40 * params)


def test_the_floor_moves_with_the_work(paper):
    import roofline

    lengths = [8 + 38 * i // 63 for i in range(64)]
    padded = roofline.step_floor(paper, lengths, padded=True)
    packed = roofline.step_floor(paper, lengths, padded=False)
    total = roofline.total_ms
    assert total(packed) < total(padded)
    assert all(r.ms > 0 and r.gbyte > 0 for r in padded)
    assert total(padded) == pytest.approx(sum(r.ms for r in padded))
    wide = roofline.step_floor(paper, lengths, hbm_tbps=2 * roofline.H200_HBM_TBPS)
    assert total(wide) < total(padded)
    b256 = roofline.step_floor(paper, lengths * 4)
    assert total(b256) / 256 < total(padded) / 64  # a larger batch spreads the weight reads
    text = roofline.table(padded, 64)
    assert text.count("\n") == len(padded) + 2 and "questions/s" in text


def test_the_command_says_it_predicts(capsys):
    import roofline

    assert roofline.main(["--batch", "8", "--tokens", "12", "--set", "model.image_size=32"]) == 0
    out = capsys.readouterr().out
    assert "predicted floor, not a measurement" in out and "| **step** |" in out


def test_copy_bandwidth_is_measured():
    import workload

    assert workload.copy_gbps(nbytes=1 << 20, min_seconds=0.01, device="cpu") > 0


def test_an_epochs_floor_counts_each_batchs_bucket(paper):
    import numpy as np
    import roofline

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 47, size=64 * 40)  # 40 batches, lengths 8..46: buckets 8, 16, …, 40, 46
    shuffled = roofline.expected_floor(paper, lengths, 64)
    bucketed = roofline.expected_floor(paper, lengths, 64, bucketed=True)
    assert shuffled["batches"] == bucketed["batches"] == 40
    assert sum(shuffled["bucket_counts"].values()) == 40
    assert set(shuffled["bucket_counts"]) == {
        46
    }  # 64 uniform lengths: the longest is nearly always in 41..46
    assert len(bucketed["bucket_counts"]) > 3 and bucketed["mean_bucket"] < shuffled["mean_bucket"]
    assert bucketed["mean_floor_ms"] < shuffled["mean_floor_ms"]
    one = roofline.total_ms(roofline.step_floor(paper, [46] * 64))
    assert shuffled["mean_floor_ms"] == pytest.approx(one)  # one bucket: its floor
    assert shuffled["questions_per_s"] == pytest.approx(64 / one * 1e3)
    with pytest.raises(ValueError, match="no batch"):
        roofline.expected_floor(paper, lengths[:10], 64)


def test_the_command_reads_a_caches_lengths(bench_dataset, capsys):
    import roofline

    argv = [
        "--batch",
        "8",
        "--tokens",
        "12",
        "--set",
        "model.image_size=32",
        "--cache",
        bench_dataset["cache"],
    ]
    assert roofline.main(argv) == 0
    out = capsys.readouterr().out
    assert "| shuffled |" in out and "| data.bucket_by_length |" in out
