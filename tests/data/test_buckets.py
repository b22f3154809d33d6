"""`data.bucket_by_length`: batches of similar lengths, still shuffled, and only a permutation of what it gets."""

from __future__ import annotations

import numpy as np
import pytest

from fastfilm.data.buckets import bucket_rows


def clevr_like_lengths(q: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(6.0, 3.4, q)), 5, 45).astype(np.int64)  # mean ≈ 20 tokens


@pytest.mark.parametrize("q,batch", [(1000, 8), (1003, 8), (37, 5), (4, 8)])
def test_a_permutation_with_the_partial_batch_last(q, batch):
    lengths = clevr_like_lengths(q)
    order = np.random.default_rng(1).permutation(q)
    out = bucket_rows(order, lengths, batch, np.random.default_rng(2))
    assert sorted(out.tolist()) == list(range(q)) and out.dtype == order.dtype
    full = q // batch * batch
    assert set(out[full:].tolist()) == set(order[full:].tolist())  # the partial tail: same questions, last


def test_batches_have_similar_lengths_and_random_order():
    q, b = 4096, 16
    lengths = clevr_like_lengths(q)
    order = np.random.default_rng(3).permutation(q)
    out = bucket_rows(order, lengths, b, np.random.default_rng(4))

    def padded_steps(rows):  # RNN steps a batch padded to its longest costs
        return int(sum(lengths[rows[i : i + b]].max() * b for i in range(0, len(rows), b)))

    real = int(lengths.sum())
    assert padded_steps(out) < 1.1 * real < padded_steps(order)  # padding: < 10% bucketed, far more shuffled
    means = [lengths[out[i : i + b]].mean() for i in range(0, q, b)]
    assert abs(np.corrcoef(means[:-1], means[1:])[0, 1]) < 0.2  # consecutive batches: no length trend
    # Seeded: the same generator state gives the same order, another one another order.
    again = bucket_rows(order, lengths, b, np.random.default_rng(4))
    assert np.array_equal(out, again)
    assert not np.array_equal(out, bucket_rows(order, lengths, b, np.random.default_rng(5)))
    # Which questions share a batch is still random among equal lengths (ties keep the shuffled order).
    other = bucket_rows(np.random.default_rng(6).permutation(q), lengths, b, np.random.default_rng(4))
    assert {frozenset(out[i : i + b]) for i in range(0, q, b)} != {
        frozenset(other[i : i + b]) for i in range(0, q, b)
    }


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size and window"):
        bucket_rows(np.arange(4), np.ones(4, int), 0, np.random.default_rng(0))
