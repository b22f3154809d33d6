"""kernels/interpreter_compat.py: triton 3.6's interpreter (the lowest triton setup.py allows) runs a kernel whose
loop bound is a loaded scalar with the numpy this venv has, and rounds an fma once; triton 3.9's needs neither."""

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import triton

from kernels.interpreter_compat import _fma_once

ROOT = Path(__file__).resolve().parents[1]
TRITON_36 = os.environ.get("FASTFILM_TRITON_36", str(ROOT / ".venv" / "triton-3.6"))

# The sum of x[0:n] with n loaded from memory: `range(0, n)` calls the interpreter's tensor.__index__.
KERNEL = """
import sys
import torch
import triton
import triton.language as tl

if sys.argv[1] == "fix":
    from kernels import interpreter_compat

    print("installed:", interpreter_compat.install())
    print("again:", interpreter_compat.install())  # each fix once: the second call finds them in place


@triton.jit
def _sum_first(x_ptr, n_ptr, out_ptr):
    n = tl.load(n_ptr)
    acc = 0.0
    for i in range(0, n):
        acc += tl.load(x_ptr + i)
    tl.store(out_ptr, acc)


@triton.jit
def _fma(a_ptr, b_ptr, c_ptr, out_ptr):
    tl.store(out_ptr, tl.fma(tl.load(a_ptr), tl.load(b_ptr), tl.load(c_ptr)))


# linspace(-1, 1, 7)[3] as torch and kernels/conv_coords.py compute it: fma(-step, 3, 1), step = 2/6 rounded
for dtype in (torch.float32, torch.float64):
    step = torch.tensor([2 / 6], dtype=dtype)
    out = torch.zeros(1, dtype=dtype)
    _fma[(1,)](-step, torch.tensor([3.0], dtype=dtype), torch.ones(1, dtype=dtype), out)
    print(str(dtype), "fma", "once" if torch.equal(out, torch.linspace(-1, 1, 7, dtype=dtype)[3:4]) else "twice")
out = torch.zeros(1)
_sum_first[(1,)](torch.arange(10, dtype=torch.float32), torch.tensor([4], dtype=torch.int32), out)
print(triton.__version__, "sum", out.item())
"""


def run_kernel(fix: bool, triton_path: str | None) -> subprocess.CompletedProcess:
    path = [triton_path] if triton_path else []
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([*path, str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-c", KERNEL, "fix" if fix else "plain"], env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(
    not (Path(TRITON_36) / "triton").is_dir(),
    reason=f"no triton 3.6.0 in {TRITON_36} (make setup installs it; FASTFILM_TRITON_36 names another folder)",
)
def test_triton_3_6_interpreter_runs_a_loop_over_a_loaded_bound():
    fixed = run_kernel(fix=True, triton_path=TRITON_36)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "installed: ['index_squeezes_scalars', 'fma_rounds_once']" in fixed.stdout
    assert "again: ['index_squeezes_scalars', 'fma_rounds_once']" in fixed.stdout
    assert "3.6.0 sum 6.0" in fixed.stdout
    assert "torch.float32 fma once" in fixed.stdout and "torch.float64 fma once" in fixed.stdout
    plain = run_kernel(fix=False, triton_path=TRITON_36)
    assert "torch.float32 fma twice" in plain.stdout and "torch.float64 fma twice" in plain.stdout
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        # the failure the fix is for (numpy 2.4 refuses int() of a 1-element 1-d array)
        assert plain.returncode != 0
        assert "only 0-dimensional arrays can be converted" in plain.stderr
    else:
        assert plain.returncode == 0, plain.stderr[-2000:]


def test_the_venvs_triton_runs_both_kernels_and_from_3_9_needs_no_fix():
    result = run_kernel(fix=True, triton_path=None)
    assert result.returncode == 0, result.stderr[-2000:]
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9):
        assert "installed: []" in result.stdout and "again: []" in result.stdout
    assert "sum 6.0" in result.stdout
    assert "torch.float32 fma once" in result.stdout and "torch.float64 fma once" in result.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_once_is_the_exact_value_rounded_to_nearest_even(dtype):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 2000)).astype(dtype)
    z = -(x.astype(np.float64) * y).astype(dtype)  # cancellation: where one rounding and two differ most
    z[::3] = rng.standard_normal(len(z[::3])).astype(dtype)
    got = _fma_once(x, y, z)
    assert got.dtype == dtype and np.any(got != x * y + z)
    for a, b, c, g in zip(x, y, z, got):
        exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        err = abs(Fraction(float(g)) - exact)
        for neighbour in (np.nextafter(g, dtype(np.inf)), np.nextafter(g, dtype(-np.inf))):
            assert err <= abs(Fraction(float(neighbour)) - exact)
    assert np.isnan(_fma_once(np.array([np.inf], dtype), np.zeros(1, dtype), np.ones(1, dtype))[0])
    # (8 + 2^-20)(8 − 2^-20) + 2^30 + 128 = 2^30 + 192 − 2^-40: just below the float32 midpoint 2^30 + 192, whose
    # nearest float64 is that midpoint (ties to even would give 2^30 + 256); the right float32 is 2^30 + 128
    a, b, c = (np.array([v], dtype) for v in (8 + 2**-20, 8 - 2**-20, 2**30 + 128))
    assert _fma_once(a, b, c)[0] == (2**30 + 128 if dtype == np.float32 else 2**30 + 192 - 2**-40)
    assert _fma_once(np.array(2.0, dtype), np.array(3.0, dtype), np.array(1.0, dtype)) == 7
