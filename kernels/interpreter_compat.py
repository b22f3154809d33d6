"""Triton's interpreter at the low end of what setup.py allows (triton 3.6, torch 2.11's), as triton 3.9's.

Two differences that make correct kernels fail under 3.6's interpreter (compiled kernels, on a GPU, never run this
code). `_common.py` calls `install()` when the kernels are imported under `TRITON_INTERPRET=1` (the tests, and
`kernels.mode: triton` on a CPU); it changes nothing under triton 3.9:

1. triton 3.6's interpreter turns a scalar it holds as a 1-element array into a Python int with `int(array)`
   (`tensor.__index__`, used by `range(a, b)` on loaded or computed bounds). numpy 2.4 made that an error for an
   array with a dimension ("only 0-dimensional arrays can be converted to Python scalars"), so under 3.6 + numpy
   >= 2.4 every kernel with such a loop fails in the interpreter. triton 3.9 squeezes the array first.
2. triton 3.6's `tl.fma` is `x * y + z` in numpy: two roundings, where a GPU's fma (and 3.9's interpreter) rounds
   once. `kernels/conv_coords.py` computes the coordinates as torch.linspace does, with fmas; at linspace(−1, 1,
   7)[3] one rounding gives −2.98e-8 (torch's value) and two give 0, so the exact-coordinates test failed;
   the BN kernels' FiLM (z·scale + β) and ReLU mask are fmas too.
"""

from __future__ import annotations

import inspect
from fractions import Fraction

import numpy as np


def _interpreter():
    """triton's interpreter module, or None where this triton has none."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    return interpreter


def _state(fn, flag: str, needle: str) -> str:
    """Whether triton's `fn` needs a fix: "absent" (no such function), "installed" (ours, marked with `flag`),
    "upstream" (its source no longer has the faulty `needle`: this triton is right) or "needed"."""
    if fn is None:
        return "absent"
    if getattr(fn, flag, False):
        return "installed"
    return "needed" if needle in inspect.getsource(fn) else "upstream"


def index_squeezes_scalars() -> bool:
    """Make the interpreter's `tensor.__index__` squeeze a 1-element array before `int()` (triton 3.9's line)
    where this triton's does not; True if that fix is in effect (installed now or before)."""
    interpreter = _interpreter()
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    # (3.9's own __index__ copes: `int(self.handle.data.squeeze())`)
    state = _state(patch_tensor, "_fastfilm_squeezes", "int(self.handle.data)")
    if state != "needed":
        return state == "installed"

    def patch_lang_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        # the scope restores in reverse order: this one first, then triton's, then the original
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fastfilm_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def _fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 x·y + z rounded once. The product is exact in float64, and s + e = x·y + z exactly (TwoSum).
    Rounding s to float32 is the rounding of the exact value except where s lies exactly halfway between two
    float32 values and e ≠ 0: then the exact value lies on e's side."""
    p, z64 = x.astype(np.float64) * y.astype(np.float64), z.astype(np.float64)
    s = p + z64
    e = (p - (s - z64)) + (z64 - (s - (s - z64)))
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    tie = np.isfinite(r) & (s != r64) & (s == (r64 + other.astype(np.float64)) / 2) & (e != 0)
    return np.where(tie, np.where(e > 0, np.maximum(r, other), np.minimum(r, other)), r)


def _fma64(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float64 x·y + z rounded once: exact rationals per element (slow; float64 runs only in gradcheck-sized
    tests), `float(Fraction)` being correctly rounded; non-finite values as numpy computes them."""
    out = np.array(x * y + z, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    for idx in np.ndindex(out.shape):
        if finite[idx]:
            out[idx] = float(Fraction(float(x[idx])) * Fraction(float(y[idx])) + Fraction(float(z[idx])))
    return out


def _fma_once(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x·y + z rounded once to z's dtype (float32 or float64), as an fma instruction (ties to even)."""
    x, y, z = np.broadcast_arrays(x, y, z)
    with np.errstate(all="ignore"):  # inf·0 is NaN here as in an fma, without numpy's warning
        if z.dtype == np.float32:
            return np.array(_fma32(x, y, z), dtype=np.float32)
        return _fma64(x, y, z)


def fma_rounds_once() -> bool:
    """Make the interpreter's float32/float64 `tl.fma` round once, as a GPU's fma does, where this triton's
    multiplies and then adds; True if that fix is in effect (installed now or before)."""
    interpreter = _interpreter()
    builder = getattr(interpreter, "InterpreterBuilder", None)
    create_fma = getattr(builder, "create_fma", None)
    # (3.9's own fma rounds once: `_interpreter.fma_fp32` / `fma_fp64`)
    state = _state(create_fma, "_fastfilm_once", "x.data * y.data + z.data")
    if state != "needed":
        return state == "installed"

    def fma(self, x, y, z):
        if z.data.dtype not in (np.float32, np.float64):
            return create_fma(self, x, y, z)
        return interpreter.TensorHandle(_fma_once(x.data, y.data, z.data), z.dtype.scalar)

    fma._fastfilm_once = True
    builder.create_fma = fma
    return True


def install() -> list[str]:
    """Every compatibility fix above that this triton needs, installed once; the names of those in effect."""
    return [f.__name__ for f in (index_squeezes_scalars, fma_rounds_once) if f()]
