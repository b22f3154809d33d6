"""tests/interpreter_speed.py's shortcuts (installed by tests/conftest.py) are on in the interpreted test runs and
compute what triton's own path does: one language patch per launch (not one per helper call), no int32 overflow
re-computation while `debug` is off. (Not in tests/kernels: these run only in the interpreter, on the CPU.)"""

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the shortcuts are for Triton's interpreter"
)


@triton.jit
def _scaled(x, s):
    return x * s


@triton.jit
def _row_sums_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # triton.language.standard helpers: they see tl.core too
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += _scaled(tl.load(x_ptr + row * n + cols, mask=cols < n, other=0.0), 2.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def test_both_shortcuts_are_installed():
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    assert interpreter.InterpretedFunction.__call__.__name__ == "call_in_kernel"


def test_helpers_inside_a_launch_are_not_patched_again_and_compute_the_same(monkeypatch):
    from triton.runtime import interpreter

    calls = []
    real = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: calls.append(fn.__name__) or real(fn))
    x = torch.randn(5, 37)
    out = torch.empty(5)
    _row_sums_kernel[(5,)](x, out, 37, BLOCK=16)
    torch.testing.assert_close(out, 2 * x.sum(dim=1))
    # The launch patches tl (its kernel's module) and tl.core (what tl.zeros/tl.sum see): 2, whatever the
    # 5 programs × 3 loop steps × 3 helper calls; triton's own path patched again in each of those 45+ calls.
    assert len(calls) == 2, calls
    # both restored after the launch
    assert tl.core.is_builtin(tl.core.reduce) and tl.core.is_builtin(tl.load)
