"""`fastfilm prep` at CLEVR's scale: the questions file is read one question at a time (memory bounded by the
file's text and the checked questions, not the whole parsed file with its programs), with the same result and
the same errors as parsing it whole."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from fastfilm.data import DataError, prep


def clevr_question(i: int, rng: random.Random, split: str = "val") -> dict:
    """A question in real CLEVR's schema, with a program of CLEVR's size (8 to 14 functions)."""
    n = rng.randint(8, 14)
    program = [{"inputs": [], "function": "scene", "value_inputs": []}] + [
        {"inputs": [k], "function": rng.choice(["filter_color", "relate", "unique"]), "value_inputs": ["red"]}
        for k in range(n - 2)
    ]
    program.append(
        {"inputs": [n - 2], "function": rng.choice(["count", "exist", "query_shape"]), "value_inputs": []}
    )
    return {
        "image_index": i // 10,
        "program": program,
        "question_index": i,
        "image_filename": f"CLEVR_{split}_{i // 10:06d}.png",
        "question_family_index": rng.randrange(90),
        "split": split,
        "question": "Are there any other things that have the same size as the red cube?",
        "answer": rng.choice(["yes", "no", "2"]),
    }


def whole(text: str, split: str = "val") -> list[dict]:
    """What read_questions must return: the file parsed whole, each question checked."""
    strings: dict[str, str] = {}
    doc = json.loads(text)
    return [prep._question_row(q, i, "", split, strings) for i, q in enumerate(doc["questions"])]


def test_memory_is_bounded_by_the_text_not_the_parsed_file(tmp_path):
    """Parsing a whole CLEVR file holds every program's dicts (7× the file's size here); streaming holds the text
    and the compact questions, its peak being the read (the file's bytes and its text at once: about 2×)."""
    rng = random.Random(0)
    questions = [clevr_question(i, rng) for i in range(12000)]
    path = tmp_path / "CLEVR_val_questions.json"
    path.write_text(json.dumps({"info": {"split": "val"}, "questions": questions}))
    size = path.stat().st_size
    del questions
    tracemalloc.start()
    try:
        rows, info = prep.read_questions(str(path), "val")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 12000 and info == {"split": "val"}
    assert rows == whole(path.read_text())
    assert peak < 3 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


@pytest.mark.parametrize(
    "text",
    [
        '{"info": {"split": "val"}, "questions": [Q0, Q1, Q2]}',
        '\n { "questions" :\n[ Q0 ,\n Q1,Q2 ] ,\t"info":{"split":"val"} }\n\n',  # whitespace, info last
        '{"questions": [Q0], "info": {}, "questions": [Q1, Q2]}',  # a repeated key: the last one wins
        '{"question\\u0073": [Q0, Q1, Q2]}',  # an escaped key
        '{"questions": []}',
        "{}",
    ],
)
def test_same_result_as_parsing_whole(tmp_path, text):
    rng = random.Random(1)
    for k in range(3):
        text = text.replace(f"Q{k}", json.dumps(clevr_question(k, rng)))
    path = tmp_path / "CLEVR_val_questions.json"
    path.write_text(text)
    doc = json.loads(text)
    if not doc.get("questions") and "questions" not in doc:
        with pytest.raises(DataError, match='expected an object with a "questions" list'):
            prep.read_questions(str(path), "val")
        return
    rows, info = prep.read_questions(str(path), "val")
    assert rows == whole(text)
    assert info == (doc.get("info") or {})


@pytest.mark.parametrize(
    "text",
    [
        '{"questions": [Q0, Q1,]}',  # a trailing comma
        '{"questions": [Q0, Q1], }',
        '{"questions": [Q0, Q1]} x',  # extra data
        '{"questions": [Q0 Q1]}',
        '{"questions": [Q0, Q1',  # truncated
        '\ufeff{"questions": [Q0]}',  # a byte order mark
        '{"questions": [Q0, {"question": NaN, "image_index": 0}, Q1] ]}',  # a bad question, then bad JSON
    ],
)
def test_bad_json_gives_json_loads_error(tmp_path, text):
    rng = random.Random(2)
    for k in range(2):
        text = text.replace(f"Q{k}", json.dumps(clevr_question(k, rng)))
    path = tmp_path / "CLEVR_val_questions.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(DataError) as got:
        prep.read_questions(str(path), "val")
    assert str(got.value) == f"{path}: not valid JSON ({expected.value})"


@pytest.mark.parametrize(
    "questions,message",
    [
        ('[Q0, {"image_index": 0}, "x"]', "question 1: missing field 'question'"),  # the first bad one
        ('{"a": [Q0]}', 'expected an object with a "questions" list'),
        ('[Q0, 3], "questions": 5', 'expected an object with a "questions" list'),  # the last key wins
    ],
)
def test_bad_questions_are_named(tmp_path, questions, message):
    text = '{"questions": ' + questions.replace("Q0", json.dumps(clevr_question(0, random.Random(3)))) + "}"
    path = tmp_path / "CLEVR_val_questions.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        prep.read_questions(str(path), "val")


def test_long_phases_show_progress(synth_set, tmp_path, capsys, monkeypatch):
    """Reading and encoding each questions file show a bar on stderr (at CLEVR's scale, seconds each), hidden
    by TQDM_DISABLE=1."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    prep.prepare(str(synth_set[0]), str(tmp_path / "c"), workers=1, splits=("train", "val"))
    err = capsys.readouterr().err
    for split in ("train", "val"):
        assert f"read CLEVR_{split}_questions.json" in err and f"encode CLEVR_{split}_questions.json" in err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    prep.prepare(str(synth_set[0]), str(tmp_path / "d"), workers=1, splits=("train", "val"))
    assert "questions.json" not in capsys.readouterr().err
