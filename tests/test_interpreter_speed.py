"""tests/interpreter_speed.py's shortcuts (installed by tests/conftest.py) are on in the interpreted test runs and
compute what triton's own path does: one language patch per launch (not one per helper call), no int32 overflow
re-computation while `debug` is off, numpy dtypes and block types of known shapes remembered. (Not in
tests/kernels: these run only in the interpreter, on the CPU.)"""

import inspect
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


def test_every_shortcut_is_installed():
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    assert interpreter.InterpretedFunction.__call__.__name__ == "call_in_kernel"
    assert interpreter._get_np_dtype.cached and tl.core.block_type.__init__.fast


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


def test_numpy_dtype_lookup_is_cached_and_answers_as_triton_does():
    from triton.runtime import interpreter

    fast = interpreter._get_np_dtype
    assert getattr(fast, "cached", False)
    real = inspect.getclosurevars(fast).nonlocals["real"]
    types = [tl.int1, tl.int8, tl.uint8, tl.int32, tl.uint32, tl.int64, tl.float16, tl.bfloat16, tl.float32]
    types += [tl.float64, tl.float8e5, tl.pointer_type(tl.float32), tl.pointer_type(tl.bfloat16)]
    types += [tl.block_type(t, [4, 8]) for t in types]
    for t in types * 2:  # the second round from the cache
        assert fast(t) == real(t), t


def test_block_types_from_known_shapes_equal_tritons_own():
    real = tl.core.block_type.__init__
    assert getattr(real, "fast", False)
    slow = inspect.getclosurevars(real).nonlocals["real_init"]
    slow_tensor = inspect.getclosurevars(tl.core.tensor.__init__).nonlocals["real_tensor_init"]
    for element in (tl.float32, tl.bfloat16, tl.int1, tl.pointer_type(tl.float32)):
        for shape in ([4, 8], tl.core.tuple([16]), [1, 2, 1], [tl.constexpr(8), 2]):
            for _ in range(2):  # the second from the remembered shape
                fast = tl.core.block_type(element, shape)
                own = tl.core.block_type.__new__(tl.core.block_type)
                slow(own, element, shape)
                assert vars(fast) == vars(own) and fast == own and str(fast) == str(own)
                t, t_own = tl.core.tensor("h", fast), tl.core.tensor.__new__(tl.core.tensor)
                slow_tensor(t_own, "h", own)
                assert vars(t).keys() == vars(t_own).keys() and str(t.shape) == str(t_own.shape)
                assert (
                    [type(d) for d in t.shape]
                    == [type(d) for d in t_own.shape]
                    == [tl.constexpr] * len(t.shape)
                )
                assert (t.handle, t.type, t.dtype, t.numel.value) == (
                    t_own.handle,
                    own,
                    own.scalar,
                    own.numel,
                )

    def error(init, shape) -> type | None:
        try:
            init(tl.core.block_type.__new__(tl.core.block_type), tl.float32, shape)
        except (ValueError, TypeError, AssertionError) as e:
            return type(e)
        return None

    # triton's own errors, also on a second try (a builtin tuple: an error in triton 3.9, accepted by 3.6)
    assert error(slow, [3, 4]) is not None
    for bad in ([3, 4], [0], [2**21, 2**21], (4, 8)):
        for _ in range(2):
            assert error(real, bad) == error(slow, bad), bad
