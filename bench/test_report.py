"""HARNESS TESTS, not benchmarks: bench/report.py on a small fabricated JSON, bench/gpu_run.sh's syntax, and
bench/profile_step.py on one tiny step. They check shapes and wiring only; no timing is asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import benchlib
import pytest
import report

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench(group, kind, impl, median, extra=None, **info):
    return {
        "group": group,
        "name": f"test_{kind}[{impl}]",
        "fullname": f"bench/test_x.py::test_{kind}[{impl}]",
        "params": {},
        "param": impl,
        "extra_info": {"kind": kind, "impl": impl, "device": "CPU: fabricated", **info, **(extra or {})},
        "options": {},
        "stats": {
            "min": median * 0.9,
            "max": median * 1.2,
            "mean": median * 1.05,
            "stddev": median * 0.1,
            "rounds": 5,
            "median": median,
            "iterations": 1,
        },
    }


def fabricated(device_type="cpu"):
    g = "op/bn_film_relu fwd bf16 N=4 C=16 7x7"
    s = "train_step/bf16 image=32 batch=8"
    common = {"dtype": "bf16", "batch": 8, "question_len": 12}
    return {
        "machine_info": {
            "node": "fabricated",
            "system": "Linux",
            "fastfilm": {
                "device": "CPU: fabricated (2 cores)" if device_type == "cpu" else "NVIDIA H100 80GB HBM3",
                "device_type": device_type,
                "torch": "2.13.0",
                "triton": "3.9.0",
                "quick": True,
            },
        },
        "commit_info": {"id": "0123456789abcdef", "dirty": True, "branch": "main"},
        "datetime": "2025-01-01T00:00:00",
        "version": "5.3.1",
        "benchmarks": [
            _bench(g, "op", "reference", 4e-3, {"gb_per_s": 1.0}),
            _bench(g, "op", "compile", 2e-3, {"gb_per_s": 2.0}),
            _bench(g, "op", "triton", 1e-3, {"gb_per_s": 4.0}),
            _bench(s, "train_step", "reference", 0.2, {"questions_per_s": 40.0}, **common),
            _bench(s, "train_step", "compile", 0.1, {"questions_per_s": 80.0}, **common),
            _bench("generator/bf16", "generator", "reference", 0.05, {"pass": "fwdbwd"}, **common),
            _bench("loader/x", "loader", "cache", 0.01, {"questions_per_s": 9600.0}),
            _bench("loader/x", "loader", "png", 0.5, {"questions_per_s": 192.0}),
        ],
        "fastfilm_skipped": [
            {
                "test": "bench/test_train_step.py::test_train_step[bf16-triton]",
                "reason": benchlib.INTERPRETER_SKIP,
            }
        ],
    }


def test_report_on_fabricated_json(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(fabricated("cpu")))
    out = tmp_path / "RESULTS.md"
    assert report.main([str(src), "-o", str(out)]) == 0
    md = out.read_text()
    # The CPU warning comes before any number.
    assert "SHAPE-CHECK ONLY" in md.split("## ")[0]
    for heading in ("Fused ResBlock op", "One training step", "FiLM generator alone", "Loader alone"):
        assert heading in md
    # Speed-ups: reference 4 ms ÷ triton 1 ms = 4×, compile 2 ms ÷ triton 1 ms = 2×.
    op_summary = next(line for line in md.splitlines() if line.startswith("| bn_film_relu fwd bf16"))
    assert "4.00×" in op_summary and "2.00×" in op_summary
    # A train step whose triton case was skipped says so instead of inventing a ratio.
    step_summary = next(line for line in md.splitlines() if line.startswith("| bf16 image=32"))
    assert "skipped / not run" in step_summary and "4.00×" not in step_summary
    # Generator share: 50 ms of a 200 ms (reference) and a 100 ms (compile) step.
    assert "| 25% |" in md and "| 50% |" in md
    assert benchlib.INTERPRETER_SKIP in md
    assert "9,600 questions/s" in md


def test_groups_sort_numbers_as_numbers():
    names = ["op/x N=512", "op/x N=64", "op/x N=256"]
    assert sorted(names, key=report.natural_key) == ["op/x N=64", "op/x N=256", "op/x N=512"]


def test_report_on_gpu_json_has_no_cpu_warning(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(fabricated("cuda")))
    md = report.render(json.loads(src.read_text()))
    assert "SHAPE-CHECK" not in md and "NVIDIA H100" in md


def test_gpu_run_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    subprocess.run([bash, "-n", os.path.join(HERE, "gpu_run.sh")], check=True)


def test_profile_step_runs_one_tiny_step(tmp_path):
    import profile_step

    assert (
        profile_step.main(["--out", str(tmp_path), "--modes", "reference", "--steps", "1", "--warmup", "0"])
        == 0
    )
    summary = json.loads((tmp_path / "profile_summary.json").read_text())
    assert [r["mode"] for r in summary["results"]] == ["reference"]
    assert (tmp_path / "profile_summary.md").read_text().startswith("# Train-step profile")
    assert (tmp_path / "profile_reference_bf16.txt").exists()


def test_report_flops_and_ceiling_columns():
    data = fabricated("cpu")
    flops = {
        "config": "clevr.json",
        "lengths_source": "CLEVR's mean",
        "mean_tokens": 20.4,
        "padded_tokens": 46.0,
        "packed_fwd_gflop": 4.76,
        "packed_fwdbwd_gflop": 14.0,
        "original_fwd_gflop": 7.46,
        "original_fwdbwd_gflop": 21.0,
    }
    data["benchmarks"] += [
        _bench("flops/clevr.json", "flops", "count", 1.0, flops),
        _bench("ceiling/matmul 2048x2048", "ceiling", "bf16", 0.04, {"gflop_per_s": 400.0}, dtype="bf16"),
    ]
    # The reference bf16 step: 0.2 s median, 8 GFLOP per step -> 40 GFLOP/s achieved, 10% of 400.
    data["benchmarks"][3]["extra_info"]["gflop_per_step"] = 8.0
    md = report.render(data)
    assert md.index("Work per question") < md.index("Fused ResBlock op")  # work and ceiling come first
    row = next(line for line in md.splitlines() if line.startswith("| clevr.json"))
    assert "**14**" in row and "0.67×" in row and "20.4 / — / 46" in row
    ceiling = next(line for line in md.splitlines() if "| reference |" in line and "| 40 |" in line)
    assert "| 400 |" in ceiling and "10.0%" in ceiling


def test_report_times_the_original():
    data = fabricated("cpu")
    setup = {"setup": "paper pixels, batch 8", "batch": 8}
    g = "original/paper pixels, batch 8"
    data["benchmarks"] += [
        _bench(g, "original", "original-fp32", 8.0, {"questions_per_s": 1.0}, **setup),
        _bench(g, "original", "fastfilm-fp32", 4.0, {"questions_per_s": 2.0}, **setup),
        _bench(g, "original", "fastfilm-bf16", 2.0, {"questions_per_s": 4.0}, **setup),
    ]
    md = report.render(data)
    rows = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| paper pixels")}
    assert "1.00×" in rows["original-fp32"] and "2.00×" in rows["fastfilm-fp32"]
    assert "4.00×" in rows["fastfilm-bf16"]


def test_cpu_modes_table_and_arguments(capsys):
    import cpu_modes

    rows = [
        {
            "config": "synthetic",
            "mode": "reference",
            "dtype": "fp32",
            "gru": "fastfilm",
            "adam": "trainer",
            "batch": 64,
            "first_step_s": 0.3,
            "median_step_s": 0.1,
            "questions_per_s": 640.0,
            "gflop_per_s": 20.0,
        },
        {
            "config": "synthetic",
            "mode": "compile",
            "dtype": "bf16",
            "gru": "fastfilm",
            "adam": "trainer",
            "batch": 64,
            "first_step_s": 30.0,
            "median_step_s": 0.05,
            "questions_per_s": 1280.0,
            "gflop_per_s": 40.0,
        },
        {"config": "paper", "mode": "reference", "dtype": "fp32", "error": "boom"},
    ]
    text = cpu_modes.table(rows, {"fp32": 100.0, "bf16": 400.0})
    compiled = next(line for line in text.splitlines() if "| compile |" in line)
    assert "2.00×" in compiled and "10.0%" in compiled and "30.0 s" in compiled
    assert "failed: boom" in text
    with pytest.raises(SystemExit):
        cpu_modes.parse_args(["--modes", "eager"])
    assert "unknown eager" in capsys.readouterr().err
    choices = [
        {
            "config": "synthetic",
            "mode": "reference",
            "dtype": "fp32",
            "why": ["precision: fp32 (x)", "kernels: y"],
        },
        {"config": "paper", "error": "no vocab"},
        {"config": "synthetic", "mode": "compile", "dtype": "fp32", "why": []},
    ]
    lines = cpu_modes.auto_lines(rows, choices)
    assert (
        "0.50× the fastest forced case (compile bf16, 1280.0)" in lines[0]
        and "precision: fp32 (x)" in lines[0]
    )
    assert lines[1] == "auto (paper): failed: no vocab" and "that case was not run" in lines[2]


def test_original_film_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    import original_film

    with pytest.raises(ValueError, match="not a checkout of ethanjperez/film"):
        original_film.load(str(tmp_path))
