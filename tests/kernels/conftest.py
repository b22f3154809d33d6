"""Kernel tests: Triton runs in its interpreter without a GPU (the variable must be set before `import triton`)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.kernels import gpu_emulation  # the interpreter computes as compiled GPU code (see the module)

    gpu_emulation.install()


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
