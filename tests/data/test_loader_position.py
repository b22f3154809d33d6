"""The loader's position in an epoch is a number of questions of its global order: valid for any ranks × batch.

A run stopped after k steps on one layout and resumed on another (fewer ranks, a smaller micro-batch) sees each
remaining question of the epoch exactly once; checked through the loader's `index` output.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastfilm.files import checkpoint as ckpt
from fastfilm.data import build_loader, load_split

from .conftest import IMAGE_SIZE


def shards(cache, n, b, *, drop_last=True, seed=3):
    return [
        build_loader(
            str(cache),
            "train",
            b,
            image_size=IMAGE_SIZE,
            num_threads=1,
            shard_id=s,
            num_shards=n,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        for s in range(n)
    ]


def steps(loaders, epoch, start_question=0, limit=None):
    """The question indices of each global step (all shards' batches of that step, in shard order)."""
    per_shard = [
        [b["index"].tolist() for b in ld.epoch(epoch, start_question=start_question)] for ld in loaders
    ]
    counts = {len(x) for x in per_shard}
    assert len(counts) == 1, f"shards ran different step counts: {counts}"
    out = [sum((p[k] for p in per_shard), []) for k in range(counts.pop())]
    return out[:limit] if limit is not None else out


def test_global_order_is_the_same_for_every_layout(cache):
    total = len(load_split(str(cache), "train")["answers"])  # 36
    order = shards(cache, 1, 4)[0].order(2).tolist()
    assert sorted(order) == list(range(total))
    for n, b in ((1, 4), (2, 3), (3, 2), (2, 5)):
        lds = shards(cache, n, b)
        assert all(ld.order(2).tolist() == order for ld in lds)
        got = steps(lds, 2)
        g = n * b
        assert len(got) == total // g and all(len(s) == g for s in got)
        assert sum(got, []) == order[: len(got) * g]  # step k consumes the k-th global batch of the order
        assert lds[0].questions_from(0) == (total // g) * b == lds[0].num_questions


@pytest.mark.parametrize("n,b", [(1, 6), (1, 3), (3, 2)], ids=["1rank", "1rank-half-batch", "3ranks-batch2"])
def test_resume_on_another_layout_sees_the_rest_of_the_epoch_exactly_once(cache, n, b):
    total = len(load_split(str(cache), "train")["answers"])  # 36 = 2 ranks × 6 × 3 steps
    first = shards(cache, 2, 6)
    done = steps(first, 1, limit=1)  # stopped after one step of 2 ranks × micro-batch 6
    position = 12
    resumed = steps(shards(cache, n, b), 1, start_question=position)
    seen = sum(done, []) + sum(resumed, [])
    assert sorted(seen) == list(range(total)), "a question was repeated or skipped"
    assert all(len(s) == n * b for s in resumed)
    now = {"world_size": n, "micro_batch": b, "gradient_accumulation_steps": 1, "global_batch": n * b}
    was = {"world_size": 2, "micro_batch": 6, "gradient_accumulation_steps": 1, "global_batch": 12}
    line = ckpt.resume_message(was, now, 1e-3, position, total)
    assert "\n" not in line and f"global batch {n * b}, lr 0.001 (not rescaled" in line
    assert f"after {position} of its {total} questions: {len(resumed)} step(s)" in line
    assert "left out" not in line


def test_resume_whose_rest_does_not_fill_a_step_says_what_is_left_out(cache):
    total = 36
    done = steps(shards(cache, 2, 6), 0, limit=1)
    resumed = steps(shards(cache, 1, 5), 0, start_question=12)  # 24 left: 4 steps of 5, 4 left out
    seen = sum(done, []) + sum(resumed, [])
    assert len(seen) == len(set(seen)) == 32
    left = set(range(total)) - set(seen)
    assert left == set(shards(cache, 1, 5)[0].order(0)[-4:].tolist())  # the epoch's last questions, as always
    now = {"world_size": 1, "micro_batch": 5, "gradient_accumulation_steps": 1, "global_batch": 5}
    line = ckpt.resume_message(None, now, 2e-3, 12, total)
    assert "4 step(s), its last 4 question(s)" in line and "left out" in line


def test_eval_from_a_position_covers_the_rest_once_over_uneven_shards(cache):
    lds = shards(cache, 3, 4, drop_last=False)  # 36 - 5 = 31 left: 2 global batches of 12, 7 split 2/2/3
    got = [i for ld in lds for b in ld.epoch(0, start_question=5) for i in b["index"].tolist()]
    order = lds[0].order(0).tolist()
    assert sorted(got) == sorted(order[5:])
    assert [ld.questions_from(5) for ld in lds] == [10, 10, 11]
    assert [ld.steps_from(5) for ld in lds] == [3, 3, 3]


def test_position_is_checked(cache):
    ld = shards(cache, 1, 4)[0]
    for bad in (-1, 37, 2.5):
        with pytest.raises(ValueError, match="start_question"):
            list(ld.epoch(0, start_question=bad))
    assert list(ld.epoch(0, start_question=36)) == [] and ld.steps_from(36) == 0
    assert isinstance(ld.rows(0, 0), np.ndarray)
