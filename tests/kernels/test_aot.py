"""Every Triton launch the kernels make compiles for H100 (sm_90) and A100 (sm_80) on this CPU-only machine:
no compile error, no register spill, shared memory within the arch's limit, no global scratch, a legal grid.

`python -m kernels.aot` records the launches of the real launchers at the paper's sizes and at edge sizes, and
compiles each distinct variant with the ptxas of the triton wheel (kernels/aot.py says how). Here it runs in a
subprocess with TRITON_INTERPRET=0 (this process has the kernels decorated for the interpreter) and a fresh
Triton cache, so every variant it compiles goes through ptxas.

make test compiles against `kernels/aot_manifest.json` (kernels/aot.py, "The manifest"): the results of the last
full run, per variant of the current sources; only variants it lacks and a sample of 24 (every kernel × arch
once, then the lowest hashes) are compiled, and a variant missing from it fails `test_manifest_has_every_variant`.
`pytest -m slow tests/kernels/test_aot.py` compiles the whole matrix (~950 variants, ~7 minutes on 2 AVX2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from kernels import aot
from kernels._common import GEMM_GPU_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {90: 232_448, 80: 166_912}  # bytes per block: H100, A100 (CUDA's opt-in maximum)
KERNELS = {
    "bn_film_relu._stats_kernel",
    "bn_film_relu._finalize_stats_kernel",
    "bn_film_relu._forward_kernel",
    "bn_film_relu._backward_reduce_kernel",
    "bn_film_relu._finalize_sums_kernel",
    "bn_film_relu._backward_dz_kernel",
    "bn_film_relu._one_launch_forward_kernel",
    "bn_film_relu._one_launch_backward_kernel",
    "conv_coords._forward_kernel",
    "conv_coords._backward_dx_kernel",
    "conv_coords._backward_dw_kernel",
}
GEMM_KIND = {
    "conv_coords._forward_kernel": "forward",
    "conv_coords._backward_dx_kernel": "dx",
    "conv_coords._backward_dw_kernel": "dw",
}


MANIFEST = ROOT / "kernels" / "aot_manifest.json"
SAMPLE = 24  # manifest variants compiled again: the first of each of the 22 (kernel, arch), then 2 by hash


def run_aot(out: Path, *extra: str) -> list[dict]:
    """`python -m kernels.aot --sizes all` for both archs in 2 compile processes; its JSON rows (launch × arch)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "kernels.aot", "--sizes", "all", "--jobs", "2", "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"kernels.aot failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """The matrix's rows, each result from the manifest or a fresh compile (the sample and what it lacks)."""
    return run_aot(
        tmp_path_factory.mktemp("aot") / "aot.json", "--manifest", str(MANIFEST), "--sample", str(SAMPLE)
    )


def test_manifest_has_every_variant(rows):
    """The manifest is the current sources' (else: `python -m kernels.aot --sizes all --write-manifest
    kernels/aot_manifest.json`), and SAMPLE (24) of its variants compiled again, exactly as it says (the problems of
    `test_every_variant_compiles_without_spills_within_limits` include any difference)."""
    recorded = json.loads(MANIFEST.read_text())["triton"]
    if recorded != triton.__version__:
        pytest.skip(
            f"{MANIFEST.name} was recorded with triton {recorded}, this is {triton.__version__}: every variant was "
            "compiled afresh, and the other tests check each one"
        )
    missing = sorted(
        {f"{r['kernel']} [{r['case']}] sm_{r['arch']}" for r in rows if r["source"] == "compiled"}
    )
    assert not missing, (
        f"{len(missing)} variants are not in {MANIFEST.name} (a kernel changed?); run `python -m kernels.aot "
        f"--sizes all --write-manifest kernels/aot_manifest.json`:\n" + "\n".join(missing[:20])
    )
    assert len({r["id"] for r in rows if r["source"] == "sampled"}) == SAMPLE


@pytest.mark.slow
def test_full_matrix_compiles_as_the_manifest_says(tmp_path):
    """Every variant compiled afresh (no manifest): no problem, and each result the manifest's."""
    fresh = run_aot(tmp_path / "aot.json")
    assert not [r for r in fresh if r["problems"]]
    known = json.loads(MANIFEST.read_text())["variants"]
    result = lambda r: {k: r[k] for k in aot.RESULT_KEYS if k in r}  # noqa: E731
    differ = [r["case"] for r in fresh if aot.manifest_mismatch(known.get(r["id"], {}), result(r))]
    assert not differ, differ[:20]


def test_matrix_is_complete(rows):
    """Every kernel, both archs, every size, layout, precision and BN mode, every autotune config was compiled."""
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["arch"] for r in rows} == {90, 80}
    cases = {r["case"] for r in rows}
    for size in ("paper", "batch 1 ", "2x2", "1 channel", "batch 70000"):
        for word in (
            "nchw",
            "nhwc",
            "tf32",
            "ieee",
            "bf16",
            "fp64",
            "train",
            "one-launch",
            "eval",
            "no_bn",
            "nores",
            "classifier",
        ):
            if size != "paper" and word == "fp64":  # float64 at the paper's sizes only (kernels/aot.py)
                assert not any(c.startswith(size) and " fp64 " in c for c in cases)
            elif not (size == "1 channel" and word == "nhwc"):  # one channel: channels_last is NCHW in memory
                assert any(c.startswith(size) and f" {word}" in c for c in cases), (
                    f"no case '{size} … {word}'"
                )
    for kernel, kind in GEMM_KIND.items():
        configs = {r["config"] for r in rows if r["kernel"] == kernel}
        want = {f"{m}x{n}x{k} w{w} s{s}" for lst in GEMM_GPU_CONFIGS[kind].values() for m, n, k, w, s in lst}
        assert configs == want, kernel
    assert all(r["bytes"] > 0 and r["predicted_us"] > 0 for r in rows)


def test_every_variant_compiles_without_spills_within_limits(rows):
    bad = []
    for r in rows:
        where = f"{r['kernel']} [{r['case']}] {r['config']} sm_{r['arch']}"
        if not r["ok"]:
            bad.append(f"{where}: {r['error']}")
            continue
        if (r["spill_stores"] or r["spill_loads"] or r["stack"]) and " fp64 " not in r[
            "case"
        ]:  # no speed path
            bad.append(f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B")
        if r["shared"] > SHARED_LIMIT[r["arch"]]:
            bad.append(f"{where}: shared memory {r['shared']} B")
        if r["scratch"]:
            bad.append(f"{where}: global scratch {r['scratch']} B")
        if r["grid"][0] >= 2**31 or max(r["grid"][1:]) > 65_535:
            bad.append(f"{where}: grid {r['grid']}")
        if r["registers"] <= 0:
            bad.append(f"{where}: no ptxas report (registers {r['registers']})")
    assert not bad, f"{len(bad)} of {len(rows)} launches fail:\n" + "\n".join(bad[:40])


def test_tensor_cores_where_expected(rows):
    """bf16 and TF32 GEMMs use wgmma on sm_90 and mma on sm_80; float64 GEMMs the DMMA (mma) on both; IEEE
    float32 GEMMs and BN kernels use none."""
    for r in rows:
        want = "-"
        if r["kernel"] in GEMM_KIND and " fp64 " in r["case"]:
            want = "mma"
        elif r["kernel"] in GEMM_KIND and " ieee " not in r["case"]:
            want = "wgmma" if r["arch"] == 90 else "mma"
        assert r["tensor_cores"] == want, f"{r['kernel']} [{r['case']}] {r['config']} sm_{r['arch']}"


def test_problems_are_detected():
    """The checks can fail: a spilling, over-shared, scratch-using or failed row is reported."""
    fine = dict(
        ok=True,
        error="",
        spill_stores=0,
        spill_loads=0,
        stack=0,
        shared=1024,
        scratch=0,
        arch=80,
        grid=[1, 1, 1],
    )
    assert aot.problems(fine) == []
    assert aot.problems(fine | {"spill_stores": 8})
    assert not aot.problems(
        fine | {"spill_stores": 8, "case": "paper fp64 nchw train"}
    )  # float64: no speed path
    assert aot.problems(fine | {"ok": False, "error": "x", "case": "paper fp64 nchw train"})
    assert aot.problems(fine | {"shared": 180_224})
    assert not aot.problems(fine | {"shared": 180_224, "arch": 90})
    assert aot.problems(fine | {"scratch": 64})
    assert aot.problems(fine | {"grid": [1, 1, 70_000]})
    assert aot.problems(fine | {"ok": False, "error": "x"})
    assert aot.manifest_mismatch({"registers": 40, "ok": True}, {"registers": 40, "ok": True}) == []
    assert aot.manifest_mismatch({"registers": 40, "ok": True}, {"registers": 41, "ok": True})
    log = "ptxas info    : Used 166 registers, used 1 barriers\n    0 bytes stack frame, 24 bytes spill stores, 8 bytes spill loads"
    assert aot._ptxas_number(r"Used (\d+) registers", log) == 166
    assert aot._ptxas_number(r"(\d+) bytes spill stores", log) == 24


# The dW kernel's G tile as triton 3.9 compiled it for sm_90 before the fix (bf16, no ReLU, 64×64×32, 3 stages):
# an asynchronous wgmma operand that is also loaded into registers (for the row sums), in a 2-slot buffer.
RACING_TTGIR = """
%g_76 = ttg.local_alloc : () -> !ttg.memdesc<2x64x32xbf16, #shared, #smem, mutable>
%g_157 = ttg.memdesc_index %g_76[%g_one_155] : !ttg.memdesc<2x64x32xbf16, #shared, #smem, mutable> -> !ttg.memdesc<64x32xbf16, #shared, #smem, mutable>
%g_158 = ttg.local_load %g_157 token %g_156 : !ttg.memdesc<64x32xbf16, #shared, #smem, mutable> -> tensor<64x32xbf16, #blocked>
%x_160 = ttg.memdesc_index %x_77[%g_one_152] : !ttg.memdesc<3x32x64xbf16, #shared1, #smem, mutable> -> !ttg.memdesc<32x64xbf16, #shared1, #smem, mutable>
%acc_161 = ttng.warp_group_dot %g_157, %x_160, %acc_134 {isAsync = true} : !ttg.memdesc<64x32xbf16, #shared, #smem, mutable> * !ttg.memdesc<32x64xbf16, #shared1, #smem, mutable> -> tensor<64x64xf32, #mma>
"""


def test_async_mma_operand_read_elsewhere_is_detected():
    """The structural check finds the H200's racing pattern, and a row with it is a problem."""
    assert aot.async_mma_operands_read_elsewhere(RACING_TTGIR) == ["%g_157"]
    fixed = RACING_TTGIR.replace("ttg.local_load %g_157", "ttg.local_load %other")
    assert aot.async_mma_operands_read_elsewhere(fixed) == []
    row = dict(ok=True, error="", spill_stores=0, spill_loads=0, stack=0, shared=1024, scratch=0, arch=90)
    assert aot.problems(row | {"grid": [1, 1, 1], "mma_operands_read": ["%g_157"]})


def test_no_async_mma_operand_is_read_elsewhere(rows):
    """No compiled GEMM feeds a shared tile to an asynchronous wgmma and also reads it into registers."""
    bad = [f"{r['kernel']} [{r['case']}] {r['config']}" for r in rows if r.get("mma_operands_read")]
    assert not bad, "\n".join(bad[:20])
    assert all("mma_operands_read" in r for r in rows if r["ok"])


TRITON_36 = os.environ.get("FASTFILM_TRITON_36", str(ROOT / ".venv" / "triton-3.6"))


@pytest.mark.skipif(
    not (Path(TRITON_36) / "triton").is_dir(),
    reason=f"no triton 3.6.0 in {TRITON_36} (make setup installs it; FASTFILM_TRITON_36 names another folder)",
)
def test_aot_compiles_under_triton_3_6(tmp_path):
    """setup.py allows triton >= 3.6: the GEMMs' paper-size matrix in float64 and bf16 compiles with the lowest one
    too, for sm_90 (the GPU these versions ran on). triton 3.6 asserts that tl.dot's out_dtype equals its
    accumulator's: the float64 GEMMs failed there. (float32, the BN kernels, the edge sizes and sm_80 under 3.6 are a
    manual run, ~20 CPU-minutes, that make test's budget keeps out; kernels/README.md says what it last found — no spill
    outside float64: `PYTHONPATH=.venv/triton-3.6:. python -m kernels.aot --sizes all --check`.)"""
    out = tmp_path / "aot36.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([TRITON_36, str(ROOT)]))
    code = "import triton, sys; assert triton.__version__ == '3.6.0', triton.__version__"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    cmd = [sys.executable, "-m", "kernels.aot", "--sizes", "paper", "--archs", "90", "--jobs", "2"]
    cmd += [
        "--only",
        "conv_coords",
        "--case",
        "paper fp64",
        "--case",
        "paper bf16",
        "--json",
        str(out),
        "--check",
    ]  # the GEMMs, where 3.6 differed; BN: manual
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (
        f"kernels.aot under triton 3.6 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {k for k in KERNELS if k.startswith("conv_coords")}
    assert {r["case"].split()[1] for r in rows} == {"fp64", "bf16"}
