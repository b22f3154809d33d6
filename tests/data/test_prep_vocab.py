"""`fastfilm prep --vocab-from/--expand-vocab/--unk-threshold` and split names taken from the data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastfilm.data import DataError, load_split, load_vocab, prep

HUMAN_QUESTIONS = [
    "Which object is the biggest?",
    "Which thing is shiny?",
    "Is the biggest thing red?",
    "Which unusual cube is there?",  # "unusual" is seen once
]


def add_split(root, split, questions, images_from="train"):
    """A questions file for `split` on the images of `images_from` (a symlinked images folder, as one would do
    for CLEVR-Humans, whose questions are about CLEVR's images)."""
    qs = [
        {
            "question": q,
            "answer": "yes" if i % 2 else "no",
            "image_index": i % 3,
            "image_filename": f"CLEVR_{images_from}_{i % 3:06d}.png",
            "question_index": i,
        }
        for i, q in enumerate(questions)
    ]
    with open(os.path.join(root, "questions", f"CLEVR_{split}_questions.json"), "w") as f:
        json.dump({"info": {}, "questions": qs}, f)
    link = os.path.join(root, "images", split)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(root, "images", images_from)), link)


def test_splits_come_from_the_data(clevr_copy):
    add_split(str(clevr_copy), "train_humans", HUMAN_QUESTIONS)
    add_split(str(clevr_copy), "valB", HUMAN_QUESTIONS[:2])
    assert prep.discover_splits(str(clevr_copy)) == ["train", "train_humans", "test", "val", "valB"]


def test_expand_vocab_keeps_old_ids_and_appends_frequent_words(clevr_copy, cache, tmp_path):
    root = str(clevr_copy)
    add_split(root, "train_humans", HUMAN_QUESTIONS)
    add_split(root, "val_humans", HUMAN_QUESTIONS[2:])
    old = load_vocab(str(cache))
    out = str(tmp_path / "humans")
    s = prep.prepare(
        root,
        out,
        splits=["train_humans", "val_humans"],
        vocab_from=str(cache),
        expand_vocab=True,
        unk_threshold=2,
        workers=1,
    )
    new = load_vocab(out)
    q_old, q_new = old["question_token_to_idx"], new["question_token_to_idx"]
    assert all(q_new[w] == i for w, i in q_old.items())  # old ids kept
    appended = sorted((i, w) for w, i in q_new.items() if w not in q_old)
    assert [i for i, _ in appended] == list(range(len(q_old), len(q_new)))
    words = [w for _, w in appended]
    assert "Which" in words and "biggest" in words  # seen twice or more
    assert "unusual" not in words  # seen once: below --unk-threshold 2
    assert words == sorted(words)
    assert new["answer_token_to_idx"] == old["answer_token_to_idx"]
    assert s["vocab"]["new_words"] == len(words)
    split = load_split(out, "train_humans")
    row = split["questions"][3][: split["lengths"][3]]
    assert 3 in row  # "unusual" → <UNK>
    unknown = s["splits"]["train_humans"]["unknown_words"]
    assert unknown["unusual"] == 1 and "Which" not in unknown and all(c < 2 for c in unknown.values())
    # Unchanged inputs: nothing to do; another threshold: the vocabulary is rebuilt.
    again = dict(splits=["train_humans", "val_humans"], vocab_from=str(cache), expand_vocab=True, workers=1)
    assert prep.prepare(root, out, unk_threshold=2, **again)["up_to_date"]
    prep.prepare(root, out, unk_threshold=1, **again)
    assert "unusual" in load_vocab(out)["question_token_to_idx"]


def test_vocab_from_without_expansion_is_the_same_vocabulary(clevr_copy, cache, tmp_path):
    root = str(clevr_copy)
    add_split(root, "val_humans", HUMAN_QUESTIONS)
    out = str(tmp_path / "zero_shot")
    s = prep.prepare(root, out, splits=["val_humans"], vocab_from=str(cache / "vocab.json"), workers=1)
    assert load_vocab(out)["hash"] == load_vocab(str(cache))["hash"]
    assert s["splits"]["val_humans"]["questions_with_unknown_words"] == 4  # every question has a new word


def test_vocab_from_an_original_vocab_json_and_checkpoint(clevr_copy, cache, tmp_path):
    import torch

    from fastfilm.prepare import prepare  # the job: an original checkpoint is a model file, not data

    old = load_vocab(str(cache))
    original = {
        "question_token_to_idx": old["question_token_to_idx"],
        "answer_token_to_idx": old["answer_token_to_idx"],
        "program_token_to_idx": {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, "scene": 4},
    }
    (tmp_path / "vocab.json").write_text(json.dumps(original))
    out = str(tmp_path / "c1")
    prep.prepare(str(clevr_copy), out, splits=["val"], vocab_from=str(tmp_path / "vocab.json"), workers=1)
    assert load_vocab(out)["hash"] == old["hash"]
    ckpt = {
        k: {}
        for k in (
            "program_generator_kwargs",
            "program_generator_state",
            "execution_engine_kwargs",
            "execution_engine_state",
        )
    }
    torch.save({**ckpt, "vocab": original}, str(tmp_path / "film.pt"), _use_new_zipfile_serialization=False)
    out2 = str(tmp_path / "c2")
    prepare(str(clevr_copy), out2, splits=["val"], vocab_from=str(tmp_path / "film.pt"), workers=1)
    assert load_vocab(out2)["hash"] == old["hash"]
    v1 = load_split(out, "val")["questions"]
    assert np.array_equal(v1, load_split(str(cache), "val")["questions"])


def test_bad_vocabulary_options(clevr_copy, tmp_path):
    root = str(clevr_copy)
    with pytest.raises(DataError, match="--expand-vocab needs --vocab-from"):
        prep.prepare(root, str(tmp_path / "a"), expand_vocab=True)
    with pytest.raises(DataError, match="unk-threshold"):
        prep.prepare(root, str(tmp_path / "a"), unk_threshold=0)
    (tmp_path / "v.json").write_text(
        json.dumps({"question_token_to_idx": {"a": 0}, "answer_token_to_idx": {}})
    )
    with pytest.raises(DataError, match="<NULL> must be 0"):
        prep.prepare(root, str(tmp_path / "a"), vocab_from=str(tmp_path / "v.json"))
    with pytest.raises(DataError, match="not found"):
        prep.prepare(root, str(tmp_path / "a"), vocab_from=str(tmp_path / "nothing"))


def test_unk_threshold_when_building(clevr_copy, cache, tmp_path):
    out = str(tmp_path / "t")
    prep.prepare(str(clevr_copy), out, splits=["train"], unk_threshold=10**6, workers=1)
    assert len(load_vocab(out)["question_token_to_idx"]) == 4  # every word rarer than the threshold
    assert len(load_vocab(str(cache))["question_token_to_idx"]) > 4


def test_unk_threshold_without_a_train_split_is_a_data_error(clevr_copy, tmp_path):
    out = str(tmp_path / "c")
    prep.prepare(str(clevr_copy), out, splits=["train", "val"], workers=1)  # a cache with its vocab.json
    with pytest.raises(DataError, match="--unk-threshold needs a train split"):
        prep.prepare(str(clevr_copy), out, splits=["val"], unk_threshold=2, workers=1)
