"""Kernel tests: Triton runs in its interpreter without a GPU (the variable must be set before `import triton`)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_rounds_to_nearest_even() -> None:
    """Make the interpreter convert float32 → bfloat16 by round-to-nearest-even, as GPUs and PyTorch do.

    The triton 3.9 interpreter truncates instead (seen: every converted value equals the truncated one), which
    doubles and biases the rounding error of bf16 results on the CPU only. Compiled kernels are not affected.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
        original = builder.cast_impl
    except (ImportError, AttributeError):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_to_nearest_even()


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU when there is one, else the CPU under the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 comparisons are made at IEEE precision: no TF32 in cuDNN convs, matmuls or our tl.dot."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
