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

`cache_numpy_dtypes`: the interpreter's `_get_np_dtype` (the numpy dtype that holds a Triton dtype) builds its
19-entry table, hashing every Triton dtype in it, on each of its calls — ~6% of an interpreted GEMM test. The
shortcut asks it once per element type and remembers the answer (a block type holds what its element type holds,
which is also how triton's function answers).

`fast_block_types`: every op result and broadcast builds a `tl.block_type`, whose `__init__` unwraps each shape
element from `constexpr` and validates the shape (powers of two, the numel limit) — ~20% of an interpreted GEMM
test, for a few distinct shapes. The shortcut remembers each validated shape of plain ints and its numel, and
sets the same four attributes for it (the shape object itself is shared); any other shape (constexpr elements, a
first sight) takes triton's `__init__`, which raises for a bad one as before. A `tl.tensor` of such a block type
gets the shape's numel and constexpr shape built once (triton builds both on every op: another ~12%).
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


def cache_numpy_dtypes() -> bool:
    """Memoise the interpreter's Triton dtype → numpy dtype lookup per element type (see the module docstring)."""
    import triton.language as tl
    from triton.runtime import interpreter

    real = getattr(interpreter, "_get_np_dtype", None)
    if real is None or getattr(real, "cached", False):
        return False
    known: dict = {}

    def get_np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # unhashable; triton answers these before building its table
            return real(element)
        try:
            return known[element]
        except KeyError:
            known[element] = found = real(element)
            return found

    get_np_dtype.cached = True
    interpreter._get_np_dtype = get_np_dtype
    return True


BLOCK_TYPE_ATTRS = {"element_ty", "shape", "numel", "name"}  # what triton 3.9's types hold (fast_block_types)
TENSOR_ATTRS = {"handle", "shape", "numel", "type", "dtype"}


def fast_block_types() -> bool:
    """Skip re-unwrapping and re-validating a block shape already validated, and share a known shape's constexpr
    form among the tensors of that shape (see the module docstring)."""
    import math

    import triton.language as tl

    core = tl.core
    cls, tensor_cls, tl_tuple, constexpr = core.block_type, core.tensor, core.tuple, core.constexpr
    real_init, real_tensor_init = cls.__init__, tensor_cls.__init__
    if getattr(real_init, "fast", False):
        return False  # installed already
    probe = cls(tl.float32, [2, 4])
    if set(vars(probe)) != BLOCK_TYPE_ATTRS or set(vars(tensor_cls(None, probe))) != TENSOR_ATTRS:
        return False  # a triton whose types hold something else
    # shape → (triton's shape object, its numel, its text); the shape objects stay alive here, so their ids are
    # stable keys of `of_tensors`: id(shape object) → a tensor's (numel, constexpr shape) for that shape
    known: dict[tuple[int, ...], tuple] = {}
    of_tensors: dict[int, tuple] = {}

    def init(self, element_ty, shape):
        # a list or triton's tuple: what triton's own assert accepts (a builtin tuple fails there)
        if type(shape) is list or type(shape) is tl_tuple:
            key = tuple(shape)
            seen = known.get(key) if all(type(d) is int for d in key) else None
            if seen is not None:
                self.element_ty, self.shape, self.numel = element_ty, seen[0], seen[1]
                self.name = f"<{seen[2]}, {element_ty}>"
                return
        real_init(self, element_ty, shape)
        # (core.py's `tuple` is triton's own tuple class: the shape is one of those, kept and shared as it is)
        key = tuple(int(d) for d in self.shape)
        if key not in known:
            known[key] = (self.shape, self.numel, str(self.shape))
            of_tensors[id(self.shape)] = (constexpr(math.prod(key)), tl_tuple([constexpr(d) for d in key]))

    def tensor_init(self, handle, type):
        seen = of_tensors.get(id(type.shape)) if type.__class__ is cls else None
        if seen is None:
            return real_tensor_init(self, handle, type)
        self.handle, self.type, self.dtype = handle, type, type.scalar
        self.numel, self.shape = seen

    init.fast = True
    cls.__init__, tensor_cls.__init__ = init, tensor_init
    return True


def install() -> list[str]:
    """Every shortcut above (tests/conftest.py and bench/conftest.py, in the interpreter); the names installed."""
    shortcuts = (skip_repatching_in_kernels, skip_dead_overflow_checks, cache_numpy_dtypes, fast_block_types)
    return [f.__name__ for f in shortcuts if f()]
