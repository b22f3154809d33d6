"""A faster Triton interpreter for the tests, computing exactly the same (imported by tests/conftest.py).

The triton 3.9 interpreter re-patches `triton.language` on every call of a `@triton.jit` helper from inside a
kernel (`InterpretedFunction.__call__` → `_patch_lang`, ~3 ms: it walks the module's globals and every attribute
of `tl`, `tl.core` and `tl.tensor`), although the kernel's own launch (`GridExecutor.__call__`) has patched the
same modules already and keeps them patched until it returns. In the BN kernels, which call small helpers in
their loops, that was ~25% of an interpreted launch. `skip_repatching_in_kernels` skips the repeat when the
helper sees no language module the launch did not patch; everything else is triton's own code path.
"""

from __future__ import annotations

import inspect
import threading


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

    def launch_patched(self, *args, **kwargs):
        outer = getattr(state, "patched", None)
        state.patched = langs(self.fn) | (outer or frozenset())
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.patched = outer

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
