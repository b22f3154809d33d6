"""bench/gpu_step.py's code paths at the small model (on a CPU: uncaptured, a shape-check; never a timing)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_step  # noqa: E402


def test_gpu_step_bench_runs_every_case_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    cases = "check_graph,eager_nchw,eager_cl,static_eager_cl,graph_cl,graph_cl_gru_fp32,graph_cl_gru_loop,graph_cl_b256,graph_cl_picked,graph_cl_compile"  # not graph_cl_triton: graph_cl on graph_cl_picked's model, ~10 s of interpreter here
    argv = [
        "--tiny",
        "--out",
        str(out),
        "--md",
        str(tmp_path / "r.md"),
        "--steps",
        "1",
        "--warmup",
        "1",
        "--profile-steps",
        "1",
    ]
    assert gpu_step.main([*argv, "--cases", cases, "--compile-backend", "eager"]) == 0
    result = json.loads(out.read_text())
    assert list(result["cases"]) == cases.split(",")
    assert result["cases"].pop("check_graph")["ok"]
    for name, row in result["cases"].items():
        assert "error" not in row, (name, row)
        assert row["ms"] > 0 and row["aten_ops_per_step"] > 0 and row["gflop_per_step"] > 0
    assert result["cases"]["graph_cl_b256"]["batch"] == 32
    # the floor (bench/roofline.py): graph mode pads the RNN to the bucket, the engine step packs it
    rows = result["cases"]
    assert all(r["floor_ms"] > 0 and r["floor_share"] > 0 for r in rows.values())
    assert rows["graph_cl"]["floor_ms"] > rows["eager_cl"]["floor_ms"]
    assert rows["graph_cl_gru_fp32"]["floor_ms"] > rows["graph_cl"]["floor_ms"]  # float32 weights, TF32 peak
    assert rows["graph_cl_b256"]["floor_ms"] > rows["graph_cl"]["floor_ms"]
    assert result["cases"]["eager_cl"]["memory_format"] == "channels_last"
    assert result["cases"]["graph_cl_gru_loop"]["question_encoder"].startswith("loop_gru")
    picks = result["cases"]["graph_cl_picked"]["kernel_picks"]
    assert picks and all(line.startswith("kernels: ") for line in picks)
    md = (tmp_path / "r.md").read_text()
    assert "| graph_cl |" in md and "original 2017 code" in md
