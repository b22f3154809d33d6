"""Bad data through `fastfilm prep` (and the trainer), as a user meets it: every case of the reliability issue.

Each case damages a private copy of a small CLEVR-format folder and re-runs `fastfilm prep` onto a folder that
already holds a good cache. A refused input must exit with status 2 and a message naming the file (and the
question's index); the existing cache must come out byte-identical, with no temp files. An input that is
skipped or mapped to `<UNK>` must be counted in the output. Unit-level checks of each reader are in
`tests/data/test_prep.py`; this file is the end-to-end table of `docs/RELIABILITY.md`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastfilm.cli import main as cli
from fastfilm.data import load_split, load_vocab
from tests.data.test_prep import png


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


def questions_file(root: Path, split: str) -> Path:
    return root / "questions" / f"CLEVR_{split}_questions.json"


def edit_questions(root: Path, split: str, fn) -> None:
    path = questions_file(root, split)
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def work(dataset, tmp_path):
    """(clevr copy, cache folder already holding a good cache of it)."""
    clevr, cache = tmp_path / "clevr", tmp_path / "cache"
    shutil.copytree(dataset / "clevr", clevr)
    shutil.copytree(dataset / "cache", cache)
    return clevr, cache


def prep(clevr: Path, cache: Path, capsys) -> tuple[int, str, str]:
    status = cli(["prep", "--clevr", str(clevr), "--out", str(cache), "--image-size", "32", "--workers", "1"])
    out = capsys.readouterr()
    return status, out.out, out.err


IMAGE = ("images", "val", "CLEVR_val_000002.png")


def damage_image(kind: str):
    def damage(clevr: Path) -> Path:
        path = clevr.joinpath(*IMAGE)
        if kind == "corrupt":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20)
        elif kind == "truncated":
            path.write_bytes(path.read_bytes()[:5000])
        elif kind == "zero-byte":
            path.write_bytes(b"")
        elif kind == "grayscale":
            Image.open(path).convert("L").save(path)
        elif kind == "16-bit":
            path.write_bytes(png(480, 320, 16, 2, 3))
        return path

    return damage


REFUSED = [
    # (case, damage(clevr) -> the file the message must name, what else it must say)
    ("corrupt PNG", damage_image("corrupt"), "CLEVR_val_000002.png"),
    ("truncated PNG", damage_image("truncated"), "cannot decode"),
    ("zero-byte PNG", damage_image("zero-byte"), "zero-byte file"),
    ("grayscale PNG", damage_image("grayscale"), "grayscale PNG"),
    ("16-bit PNG", damage_image("16-bit"), "16-bit PNG"),
    (
        "question missing a field",
        lambda c: (edit_questions(c, "val", lambda d: d["questions"][4].pop("question")), questions_file(c, "val"))[1],
        "question 4: missing field 'question'",
    ),
    (
        "question field of the wrong type",
        lambda c: (edit_questions(c, "val", lambda d: d["questions"][7].update(image_index="3")), questions_file(c, "val"))[1],
        "question 7: field 'image_index' must be int",
    ),
    (
        "empty split",
        lambda c: (edit_questions(c, "val", lambda d: d.update(questions=[])), questions_file(c, "val"))[1],
        "the split has no questions",
    ),
]  # fmt: skip


@pytest.mark.parametrize("damage,expected", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_input_names_the_file_and_keeps_the_cache(work, capsys, damage, expected):
    clevr, cache = work
    before = snapshot(cache)
    bad_file = damage(clevr)
    status, _, err = prep(clevr, cache, capsys)
    assert status == 2, err
    lines = [line.split("\r")[-1] for line in err.splitlines()]  # progress bars redraw with \r
    start = next(i for i, line in enumerate(lines) if line.startswith("fastfilm: data error: "))
    message = "\n".join(lines[start:])
    assert str(bad_file) in message and expected in message, err
    assert snapshot(cache) == before, "a refused run changed the existing cache"
    assert not temps(cache)


def test_missing_image_is_skipped_and_counted(work, capsys):
    clevr, cache = work
    clevr.joinpath(*IMAGE).unlink()
    status, out, err = prep(clevr, cache, capsys)
    assert status == 0, err
    assert "3 skipped (image missing)" in out and "CLEVR_val_000002.png" in err
    val = load_split(str(cache), "val")
    assert len(val["answers"]) == 18 - 3 and 2 not in val["image_index"]
    assert not temps(cache)


def test_question_of_only_unknown_words_is_encoded_as_unk_and_counted(work, capsys):
    clevr, cache = work
    edit_questions(clevr, "val", lambda d: d["questions"][0].update(question="Zorblax quuxes flimflam"))
    status, out, err = prep(clevr, cache, capsys)
    assert status == 0, err
    assert "1 with unknown words" in out
    vocab = load_vocab(str(cache))
    q2i = vocab["question_token_to_idx"]
    row = load_split(str(cache), "val")["questions"][0]
    tokens = [t for t in row.tolist() if t != q2i["<NULL>"]]
    assert tokens == [q2i["<START>"], q2i["<UNK>"], q2i["<UNK>"], q2i["<UNK>"], q2i["<END>"]]


def test_question_longer_than_any_in_train_is_kept_whole(work, capsys):
    clevr, cache = work
    train_len = max(
        len(q["question"].split())
        for q in json.loads(questions_file(clevr, "train").read_text())["questions"]
    )
    long_q = " ".join(["Is there a red cube left of the"] * 8) + " sphere?"
    assert len(long_q.split()) > 2 * train_len
    edit_questions(clevr, "val", lambda d: d["questions"][1].update(question=long_q))
    status, _, err = prep(clevr, cache, capsys)
    assert status == 0, err
    val, train = load_split(str(cache), "val"), load_split(str(cache), "train")
    assert val["questions"].shape[1] > train["questions"].shape[1]
    q2i = load_vocab(str(cache))["question_token_to_idx"]
    assert (
        int((val["questions"][1] != q2i["<NULL>"]).sum()) == len(long_q.split()) + 2
    )  # <START> … <END> ("?" dropped)


def test_cache_split_from_a_different_vocabulary_is_refused(work, dataset, tmp_path, capsys):
    """A split file copied in from a cache built with another vocabulary: refused by the loader and the trainer."""
    clevr, cache = work
    other_clevr, other_cache = tmp_path / "other", tmp_path / "other_cache"
    shutil.copytree(clevr, other_clevr)
    edit_questions(other_clevr, "train", lambda d: d["questions"][0].update(question="Is there a zebra?"))
    assert cli(["prep", "--clevr", str(other_clevr), "--out", str(other_cache), "--workers", "1"]) == 0
    split = next(p.name for p in other_cache.iterdir() if p.name.startswith("val") and p.suffix == ".npz")
    shutil.copy(other_cache / split, cache / split)
    capsys.readouterr()
    with pytest.raises(Exception, match="vocab") as e:
        load_split(str(cache), "val")
    assert split in str(e.value)
    cfg = {
        "model": {"image_size": 32, "stem_num_layers": 2, "num_blocks": 1, "module_dim": 8},
        "data": {"root": str(clevr), "cache": str(cache), "num_threads": 1},
        "train": {"run_dir": str(tmp_path / "run"), "epochs": 1, "progress": False},
        "deepspeed": {"train_micro_batch_size_per_gpu": 8},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert cli(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("fastfilm: data error: ") and split in err[-1]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
    assert np.load(cache / split).files  # the foreign file is left for the user to see, not deleted


@pytest.mark.parametrize("size", [0, 100, 1000])
def test_truncated_split_file_in_the_cache_is_a_data_error(work, size):
    """A cache's split file cut short (a copy that stopped, a full disk): a DataError naming it, not a
    zipfile.BadZipFile traceback from the trainer's loader."""
    from fastfilm.data import DataError

    _, cache = work
    path = cache / "val_questions.npz"
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(DataError, match=r"val_questions\.npz: cannot read") as e:
        load_split(str(cache), "val")
    assert "\n" not in str(e.value)
