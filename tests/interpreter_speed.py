"""A faster Triton interpreter for the tests, computing exactly the same (imported by tests/conftest.py).

The triton 3.9 interpreter re-patches `triton.language` on every call of a `@triton.jit` helper from inside a
kernel (`InterpretedFunction.__call__` → `_patch_lang`, ~3 ms: it walks the module's globals and every attribute
of `tl`, `tl.core` and `tl.tensor`), although the kernel's own launch (`GridExecutor.__call__`) has patched the
same modules already and keeps them patched until it returns. In the BN kernels, which call small helpers in
their loops, that was ~25% of an interpreted launch. `skip_repatching_in_kernels` skips the repeat when the
helper sees no language module the launch did not patch; everything else is triton's own code path.

`tl.sum`, `tl.zeros` and the other helpers of `triton.language.standard` see `tl.core` as well as `tl`, which a
kernel module importing only `triton.language as tl` does not: each of their calls took the slow path (1,560 calls,
~5 s of a 12 s interpreted BN test). So the launch patches `tl.core` too, as triton's first such call would (triton
leaves that patch in place; here it is undone when the launch returns, with the launch's own).

`skip_dead_overflow_checks`: with `sanitize_overflow` (on by default) every int32 add/sub/mul in the interpreter is
recomputed in int64 and compared with the int32 range, for a `device_assert` that is dropped unless `debug` is on
(`semantic.device_assert` returns at once without it; compiled code without `debug` checks nothing either). Off when
debug is off, it computes nothing else: ~40% of an interpreted BN backward (index arithmetic is most of its ops).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import types


def skip_repatching_in_kernels() -> bool:
    """Install the shortcut; False (nothing changed) when this triton's interpreter is not the expected one."""
    import triton.language as tl
    from triton.runtime import interpreter

    executor, function = interpreter.GridExecutor, getattr(interpreter, "InterpretedFunction", None)
    if function is None or not all(hasattr(function, a) for a in ("rewrite", "__call__")):
        return False
    langs_of: dict[int, frozenset[int]] = {}
    state = threading.local()

    def langs(fn) -> frozenset[int]:
        """The language modules a function sees (what _patch_lang patches for it), by id."""
        key = id(fn)
        if key not in langs_of:
            found = (v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
            langs_of[key] = frozenset(id(v) for v in found)
        return langs_of[key]

    launch, call = executor.__call__, function.__call__
    # A function that sees only `tl.core`: what `_patch_lang` patches for it is that module.
    sees_core = types.FunctionType((lambda: None).__code__, {"core": tl.core})

    def launch_patched(self, *args, **kwargs):
        outer = getattr(state, "patched", None) or frozenset()
        core_scope = None
        if id(tl.core) not in outer | langs(self.fn):
            core_scope = interpreter._patch_lang(sees_core)
        state.patched = langs(self.fn) | outer | {id(tl.core)}
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.patched = outer or None
            if core_scope is not None:
                core_scope.restore()

    def call_in_kernel(self, *args, **kwargs):
        patched = getattr(state, "patched", None)
        if not patched or not langs(self.fn) <= patched:
            return call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    executor.__call__, function.__call__ = launch_patched, call_in_kernel
    return True


def skip_dead_overflow_checks() -> bool:
    """Turn off the interpreter's int32 overflow re-computation when its assert would be dropped (debug off)."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not dataclasses.is_dataclass(options) or not hasattr(options, "sanitize_overflow"):
        return False
    if options.debug or not options.sanitize_overflow:
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True
