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


# ------------------------------------------------------------------------------- through the DALI loader
def _loader(cache, split="train", batch_size=3, **kw):
    from fastfilm.data import build_loader

    from .conftest import IMAGE_SIZE

    kw.setdefault("image_size", IMAGE_SIZE)
    kw.setdefault("num_threads", 1)
    return build_loader(str(cache), split, batch_size, **kw)


def _indices(ld, epoch=0, **kw) -> list[list[int]]:
    return [b["index"].tolist() for b in ld.epoch(epoch, **kw)]


def test_loader_training_shards_bucketed(cache):
    """2 ranks, batch 3: equal step counts, no question twice, each step's global batch of similar lengths,
    the same questions as the unbucketed epoch, and a seeded order (epoch 0 ≠ epoch 1)."""
    from fastfilm.data import load_split

    lengths = load_split(str(cache), "train")["lengths"]
    kw = {"num_shards": 2, "shuffle": True, "seed": 3, "drop_last": True}
    runs = [_indices(_loader(cache, shard_id=s, bucket_by_length=True, **kw)) for s in (0, 1)]
    plain = [_indices(_loader(cache, shard_id=s, **kw)) for s in (0, 1)]
    assert len(runs[0]) == len(runs[1]) == len(plain[0]) == 36 // 6
    seen = [i for r in runs for b in r for i in b]
    assert len(seen) == len(set(seen)) == 36
    assert set(seen) == {i for r in plain for b in r for i in b}
    spread = [np.ptp(lengths[a + b]) for a, b in zip(*runs)]  # one step: both ranks' batches
    plain_spread = [np.ptp(lengths[a + b]) for a, b in zip(*plain)]
    assert sum(spread) < sum(plain_spread)
    assert runs[0] != _indices(_loader(cache, shard_id=0, bucket_by_length=True, **kw), epoch=1)


def test_loader_bucketed_eval_and_resume_are_exact(cache):
    # Evaluation (no drop): every question once over 2 shards, the last global batch partial.
    seen = []
    for s in (0, 1):
        seen += [
            i
            for b in _indices(_loader(cache, "val", 4, shard_id=s, num_shards=2, bucket_by_length=True))
            for i in b
        ]
    assert sorted(seen) == list(range(18))
    # Resume from a batch index, and from a number of questions consumed: the rest of the same epoch.
    ld = _loader(cache, batch_size=5, seed=2, drop_last=True, bucket_by_length=True)
    full = _indices(ld, epoch=1)
    assert _indices(ld, epoch=1, start_batch=2) == full[2:]
    assert _indices(ld, epoch=1, start_question=10) == full[2:]
    # A run resumed with another batch size keeps the epoch's order when it names the one it started with.
    other = _loader(cache, batch_size=2, seed=2, drop_last=True, bucket_by_length=True, bucket_batch=5)
    rest = [i for b in _indices(other, epoch=1, start_question=10) for i in b]
    assert rest == ld.order(1)[10:].tolist()  # 26 questions: batches of 2 drop none of them
    assert rest[:25] == [i for b in full[2:] for i in b]


def test_config_switch_reaches_the_training_loader_only(cache):
    import os

    from fastfilm.config import DataConfig, load_config
    from fastfilm.data.loader import loader_for

    assert DataConfig().bucket_by_length is False  # the paper's shuffled batches stay the default
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(
        os.path.join(root, "configs", "synthetic.json"),
        ["data.bucket_by_length=true", "model.image_size=32", "deepspeed.train_micro_batch_size_per_gpu=4"],
    )
    assert loader_for(cfg, "train", train=True, cache_dir=str(cache)).bucket_by_length
    assert not loader_for(cfg, "val", train=False, cache_dir=str(cache)).bucket_by_length
