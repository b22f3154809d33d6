"""Make the Triton interpreter compute as compiled GPU code does, where it differs (imported by conftest.py).

The interpreter proves a kernel's math, not its GPU path: it widened float scalars to Python doubles, ignored
`tl.dot`'s input_precision (TF32 never ran on a CPU) and truncated float32 → bfloat16 conversions. Each bug of
that kind that reached the GPU (2026-12-04, H200) now fails a CPU test first. What this module changes:

- `rounds_to_nearest_even`: float32 → bfloat16 by round-to-nearest-even, as GPUs and PyTorch do (the triton 3.9
  interpreter truncates, which doubles and biases the rounding error of bf16 results on the CPU only).
- `typed_float_arguments`: a Python float argument arrives as the kernel's scalar type: float32, or float64
  where the parameter is annotated `tl.float64` (a compiled kernel gets fp32 for an unannotated float).
- `tf32_products`: `tl.dot(..., input_precision="tf32")` on float32 operands drops each operand's 13 low
  mantissa bits first, as the tensor cores read them (the H200's TF32 results were reproduced bit for bit by
  such a truncating emulation).

`FASTFILM_KERNELS_AS_GPU=sm_90` (kernels/_common.py) adds the launchers' side: the GPU's tiles, autotune
candidates and splits.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


def rounds_to_nearest_even() -> None:
    """float32 → bfloat16 conversions in the interpreter round to nearest even."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


class _TypedFloat:
    """A float kernel argument and the scalar type a compiled kernel receives it as."""

    __slots__ = ("value", "dtype")

    def __init__(self, value: float, dtype) -> None:
        self.value, self.dtype = value, dtype


def _is_float64(annotation) -> bool:
    text = str(annotation).removeprefix("tl.").removeprefix("triton.language.")
    return text in ("float64", "fp64")


def typed_float_arguments() -> None:
    """Float arguments reach interpreted kernels as float32 (float64 when annotated so), as compiled ones do."""
    import triton.language as tl
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    original_call, original_cvt = executor.__call__, interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, _TypedFloat):
            np_dtype = np.float64 if arg.dtype == tl.float64 else np.float32
            return tl.tensor(
                interpreter.TensorHandle(np.array([arg.value], dtype=np_dtype), arg.dtype), arg.dtype
            )
        return original_cvt(arg)

    def call(self, *args, **kwargs):
        params = inspect.signature(self.fn).parameters

        def typed(name: str, value):
            if type(value) is not float or name in self.constexprs:
                return value
            return _TypedFloat(value, tl.float64 if _is_float64(params[name].annotation) else tl.float32)

        args = tuple(typed(name, v) for name, v in zip(params, args))
        kwargs = {k: typed(k, v) if k in params else v for k, v in kwargs.items()}
        return original_call(self, *args, **kwargs)

    interpreter._implicit_cvt = implicit_cvt
    executor.__call__ = call


def tf32_products() -> None:
    """`tl.dot` with input_precision "tf32" truncates float32 operands to TF32 (10 mantissa bits) first."""
    from triton.runtime import interpreter

    builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    original = builder.create_dot

    def to_tf32(t):
        if t.data.dtype != np.float32:
            return t
        bits = np.ascontiguousarray(t.data).view(np.uint32) & np.uint32(0xFFFFE000)
        return handle(bits.view(np.float32), t.dtype.scalar)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).rsplit(".", 1)[-1].lower() == "tf32":
            a, b = to_tf32(a), to_tf32(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


def install() -> None:
    """All of the above (call once, under TRITON_INTERPRET=1, before any kernel runs)."""
    rounds_to_nearest_even()
    typed_float_arguments()
    tf32_products()
