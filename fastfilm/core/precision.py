"""Mixed precision, decided in one place for training, evaluation, analysis and prediction.

The DeepSpeed section's `bf16`, `fp16` or `torch_autocast` picks the autocast dtype of the forward; parameters,
BatchNorm statistics, the loss and the optimizer stay float32 (see README, "Precision").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def autocast_dtype(ds: Mapping[str, Any]) -> torch.dtype | None:
    """The forward's autocast dtype for a DeepSpeed section (None: float32 throughout)."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    ac = ds.get("torch_autocast", {})
    if ac.get("enabled"):
        return _DTYPES.get(str(ac.get("dtype", "bfloat16")).replace("torch.", ""), torch.bfloat16)
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `dtype` on `device`'s type, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
