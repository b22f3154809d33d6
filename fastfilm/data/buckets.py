"""Length-bucketed batch order (`data.bucket_by_length`): batches of questions of similar lengths, still shuffled.

The loader pads each batch to its longest question and the question RNN steps up to that length, reading its
hidden-to-hidden weights at every step (the H200 profile, bench/RESULTS_GPU.md): a batch whose questions have
similar lengths takes fewer steps. `bucket_rows` reorders a sequence of question rows that the loader cuts into
consecutive batches:

1. cut the rows into windows of `window` batches (in their shuffled order);
2. in each window, sort by length (a stable sort: questions of equal length keep their shuffled order);
3. cut each sorted window into batches, and shuffle the order of all those batches over the whole sequence.

It only permutes the rows it is given, and the last batch, when partial, stays last and partial: applied to a
shard's rows for an epoch, it keeps the shard's questions, its number of batches (training: every rank the same)
and, with a seeded generator, it is a function of (seed, epoch, shard), so resuming from a batch index is exact.
What it changes: which questions share a batch (similar lengths, so batch composition correlates with length,
and on CLEVR with question family), and the order of the batches.
"""

from __future__ import annotations

import numpy as np

WINDOW_BATCHES = 16  # batches per sorting window: each batch holds about 1/16 of a window's length range


def bucket_rows(
    rows: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    window: int = WINDOW_BATCHES,
) -> np.ndarray:
    """`rows` reordered so that each consecutive `batch_size` rows have similar `lengths[row]` (see module doc)."""
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size} and {window}")
    rows = np.asarray(rows)
    full = len(rows) // batch_size * batch_size
    span = window * batch_size
    batches = []
    for lo in range(0, full, span):
        chunk = rows[lo : min(lo + span, full)]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    out = [batches[i] for i in order] + [rows[full:]]  # a partial last batch stays last
    return np.concatenate(out).astype(rows.dtype, copy=False) if out else rows
