"""bench/ingest_gpu_run.py: a gpu_run.sh output goes into bench/gpu/NAME/ and a RESULTS_GPU.md section whose figures
are the run's own; a CPU run, an existing folder, a bad name and a broken archive are refused in one line and write
nothing."""

from __future__ import annotations

import json
import os
import stat
import tarfile

import ingest_gpu_run
import pytest

ENV = """Sat Dec  7 10:00:00 UTC 2026
nproc: 16
repo: /tmp/fastfilm (abc1234)
python 3.12.3 /opt/torch/.venv/bin/python3
  torch              2.11.0+cu130  /opt/torch/site-packages/torch/__init__.py
  triton             3.6.0  /opt/torch/site-packages/triton/__init__.py
  deepspeed          0.19.8  /tmp/site/deepspeed/__init__.py
  nvidia.dali        MISSING (ModuleNotFoundError: No module named 'nvidia.dali')
cuda available: {cuda} | device: {device} | torch.version.cuda: 13.0 | cudnn: 91900
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="10"><testcase classname="tests.kernels.test_a" name="test_ok"/><testcase
classname="tests.kernels.test_b" name="test_bad[bf16]"><failure message="x">boom</failure></testcase>
</testsuite></testsuites>"""


def _run_folder(root, cuda=True):
    run = root / "h200"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "env.log").write_text(
        ENV.format(cuda=cuda, device="NVIDIA H200" if cuda else "None"), encoding="utf-8"
    )
    (run / "summary.tsv").write_text(
        "step\texit\tseconds\tlog\nenv\t0\t3\tlogs/env.log\nkernel_tests\t1\t200\tlogs/kernel_tests.log\n"
    )
    (run / "kernel_tests.xml").write_text(JUNIT)
    (run / "gpu_step.md").write_text(
        "# GPU train step (bench/gpu_step.py)\n\n| case | ms |\n| --- | ---: |\n| graph_cl | 9.87 |\n"
    )
    bench = [
        {
            "group": "op/bn_film_relu fwd bf16 N=64",
            "name": "a",
            "extra_info": {"impl": impl},
            "stats": {"median": m},
        }
        for impl, m in (("reference", 1e-4), ("triton", 4e-5))
    ]
    (run / "ops.json").write_text(json.dumps({"benchmarks": bench}))
    (run / "NOTES.txt").write_text("DALI pieces ABSENT: continuing without DALI\n")
    (run / "train_summary.md").write_text("| kernels | steps |\n| --- | ---: |\n| reference | 200 |\n")
    (run / "profile").mkdir()
    return run


def _results(tmp_path):
    path = tmp_path / "RESULTS_GPU.md"
    path.write_text(
        "# fastfilm on GPUs\n\nintro\n\n## 2026-12-04, NVIDIA H200\n\nold section\n", encoding="utf-8"
    )
    return path


def test_a_run_becomes_a_folder_and_the_first_section(tmp_path):
    run = _run_folder(tmp_path / "src")
    archive = tmp_path / "gpu_run.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname="h200")
    results, dest = _results(tmp_path), tmp_path / "gpu"
    dest.mkdir()
    argv = [str(archive), "--name", "2026-12-07-h200", "--results", str(results), "--dest-root", str(dest)]
    assert ingest_gpu_run.main([*argv, "--command", "bash bench/gpu_run.sh /tmp/gr/h200"]) == 0
    assert (dest / "2026-12-07-h200" / "kernel_tests.xml").exists()
    assert (dest / "2026-12-07-h200" / "logs" / "env.log").exists()
    text = results.read_text(encoding="utf-8")
    assert text.index("## 2026-12-07-h200, NVIDIA H200 (main at abc1234)") < text.index("## 2026-12-04")
    assert text.startswith("# fastfilm on GPUs\n\nintro\n\n## 2026-12-07")
    assert "torch 2.11.0+cu130, triton 3.6.0, deepspeed 0.19.8, nvidia.dali missing" in text
    assert "| kernel_tests | 1 | 200 |" in text
    assert "**7 passed, 1 failed, 0 errors, 2 skipped**" in text
    assert "- `tests.kernels.test_b::test_bad[bf16]`" in text
    assert "| graph_cl | 9.87 |" in text and "# GPU train step" not in text
    assert "| op/bn_film_relu fwd bf16 N=64 | 0.1000 | 0.0400 | 0.40 |" in text
    assert "bash bench/gpu_run.sh /tmp/gr/h200" in text
    assert "A CPU dry run" not in text
    assert "- DALI pieces ABSENT: continuing without DALI" in text
    assert "| reference | 200 |" in text and "Also in the folder: `profile`." in text


def test_refusals_write_nothing(tmp_path, capsys):
    cpu = _run_folder(tmp_path / "cpu", cuda=False)
    results, dest = _results(tmp_path), tmp_path / "gpu"
    dest.mkdir()
    before = results.read_text(encoding="utf-8")
    common = ["--results", str(results), "--dest-root", str(dest)]
    assert ingest_gpu_run.main([str(cpu), "--name", "2026-12-07-cpu", *common]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert ingest_gpu_run.main([str(cpu), "--name", "h200", *common]) == 2
    assert "DATE-DEVICE" in capsys.readouterr().err
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"not a tar")
    assert ingest_gpu_run.main([str(broken), "--name", "2026-12-07-h200", *common]) == 2
    assert "not a readable archive" in capsys.readouterr().err
    assert ingest_gpu_run.main([str(tmp_path / "nothing"), "--name", "2026-12-07-h200", *common]) == 2
    assert results.read_text(encoding="utf-8") == before and list(dest.iterdir()) == []
    (dest / "2026-12-07-h200").mkdir()
    gpu = _run_folder(tmp_path / "gpu_src")
    assert ingest_gpu_run.main([str(gpu), "--name", "2026-12-07-h200", *common]) == 2
    assert "exists already" in capsys.readouterr().err
    assert results.read_text(encoding="utf-8") == before


def test_read_only_files_are_copied_writable(tmp_path):
    run = _run_folder(tmp_path / "src")
    for dirpath, _dirs, files in os.walk(run, topdown=False):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
        os.chmod(dirpath, 0o555)
    results, dest = _results(tmp_path), tmp_path / "gpu"
    dest.mkdir()
    try:
        assert (
            ingest_gpu_run.main(
                [str(run), "--name", "2026-12-07-h200", "--results", str(results), "--dest-root", str(dest)]
            )
            == 0
        )
    finally:
        for dirpath, _dirs, _files in os.walk(run):
            os.chmod(dirpath, 0o755)
    # neither the files nor the folders kept the read-only bits (mode bits: root would write anyway)
    for dirpath, _dirs, files in os.walk(dest / "2026-12-07-h200"):
        assert os.stat(dirpath).st_mode & stat.S_IWUSR, dirpath
        for f in files:
            assert os.stat(os.path.join(dirpath, f)).st_mode & stat.S_IWUSR, f


def test_a_cpu_dry_run_is_labelled_when_allowed(tmp_path):
    cpu = _run_folder(tmp_path / "cpu", cuda=False)
    results, dest = _results(tmp_path), tmp_path / "gpu"
    dest.mkdir()
    argv = [
        str(cpu),
        "--name",
        "2026-12-07-dry",
        "--results",
        str(results),
        "--dest-root",
        str(dest),
        "--allow-cpu",
    ]
    assert ingest_gpu_run.main(argv) == 0
    assert "**A CPU dry run (`--allow-cpu`): none of its numbers is a GPU figure.**" in results.read_text()


@pytest.mark.parametrize("cut", ["<testsuites><testsuite", ""])
def test_a_cut_off_junit_file_is_said(tmp_path, cut):
    run = _run_folder(tmp_path / "src")
    (run / "kernel_tests.xml").write_text(cut)
    lines = ingest_gpu_run.kernel_tests(str(run))
    assert "unreadable" in "\n".join(lines)
    os.remove(run / "kernel_tests.xml")
    assert ingest_gpu_run.kernel_tests(str(run)) == []
