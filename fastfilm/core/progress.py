"""Progress bars: one tqdm bar over a loader's batches, shown on rank 0 unless turned off (TQDM_DISABLE).

Evaluation, predictions and analysis show the same bar; `fastfilm.core.errors.progress_off` is the switch.
"""

from __future__ import annotations

from typing import Any


def progress_bar(loader, max_questions: int, progress: bool, desc: str | None = None) -> Any:
    """A tqdm bar over the loader's batches (fewer with `max_questions`), shown on rank 0 when `progress`."""
    import torch.distributed as dist
    from tqdm import tqdm

    from fastfilm.core.errors import progress_off

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_questions and getattr(loader, "batch_size", None):
        total = min(total, -(-max_questions // loader.batch_size))
    desc = desc or f"eval {getattr(loader, 'split', '')}"
    return tqdm(
        total=total, desc=desc, unit="batch", leave=False, disable=not (progress and rank0) or progress_off()
    )
