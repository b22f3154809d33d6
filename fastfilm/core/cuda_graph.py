"""Capturing a CUDA graph so that a failure says what failed and leaves the process as it was.

`torch.cuda.graph`'s `__exit__` ends the capture first and restores the stream after (torch 2.11-2.13,
torch/cuda/graphs.py). When an op inside the capture is illegal there (a host sync, a pageable copy, ...) the
capture is invalidated and `capture_end()` raises its own "operation failed due to a previous error during
capture": that error replaces the op's, and the stream restore after it never runs, so the process goes on with the
capture stream current. Graph mode's step (fastfilm/graphed.py) and the kernel pick's graphed timing
(fastfilm/kernel_pick.py) capture through `capture` below instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class CaptureError(RuntimeError):
    """A CUDA graph capture failed; the message names the first error (the op that broke the capture)."""


def first_error(e: BaseException) -> BaseException:
    """The error that broke a capture: `e` itself, or the one `e` was raised while handling (capture_end's
    follow-up error carries the op's error as its `__context__`)."""
    return e.__context__ if e.__context__ is not None else e


def describe(e: BaseException) -> str:
    """One line: the type and the first line of the message."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def capture(graph: Any, fn: Callable[[], T], **graph_kwargs: Any) -> T:
    """`fn()` captured into `graph` (a `torch.cuda.CUDAGraph`; `graph_kwargs` go to `torch.cuda.graph`: pool,
    stream, capture_error_mode) and its result. On failure: the stream that was current before is current again, and
    a `CaptureError` names the first error, with capture_end's follow-up (if any) after it."""
    before = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, **graph_kwargs):
            return fn()
    except Exception as e:
        torch.cuda.set_stream(before)
        first = first_error(e)
        then = f" (then at the capture's end: {describe(e)})" if first is not e else ""
        raise CaptureError(f"{describe(first)}{then}") from e
