"""The tokenizer and vocabularies against the original FiLM code's behaviour (`vr/preprocess.py`)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from fastfilm.data.tokenize import SPECIAL_TOKENS, build_vocab, encode_question, tokenize, vocab_hash

# (question, tokens) as the original's tokenize(q, punct_to_keep=[';', ','], punct_to_remove=['?', '.'])
# returns them, without its <START>/<END>. No lower-casing; a double space gives an empty token.
EXAMPLES = [
    ("Are there more big green things than large purple shiny cubes?",
     ["Are", "there", "more", "big", "green", "things", "than", "large", "purple", "shiny", "cubes"]),
    ("What number of other objects are the same size as the purple shiny object?",
     ["What", "number", "of", "other", "objects", "are", "the", "same", "size", "as", "the", "purple", "shiny",
      "object"]),
    ("There is a small gray block; are there any spheres to the left of it?",
     ["There", "is", "a", "small", "gray", "block", ";", "are", "there", "any", "spheres", "to", "the", "left",
      "of", "it"]),
    ("Is the red cube, the blue ball.", ["Is", "the", "red", "cube", ",", "the", "blue", "ball"]),
    ("what  is it", ["what", "", "is", "it"]),
    ("How many... cylinders?", ["How", "many", "cylinders"]),
]  # fmt: skip

ORIGINAL = "/tmp/film/vr/preprocess.py"


@pytest.mark.parametrize("text,tokens", EXAMPLES)
def test_tokenize_matches_the_original(text, tokens):
    assert tokenize(text) == tokens


def test_tokenize_against_the_original_source():
    """The same examples through the original `vr/preprocess.py` itself, when its checkout is on this machine."""
    if not os.path.isfile(ORIGINAL):
        pytest.skip(f"{ORIGINAL} not present (the hard-coded examples above still check the behaviour)")
    spec = importlib.util.spec_from_file_location("film_preprocess", ORIGINAL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    texts = [t for t, _ in EXAMPLES] + [
        "Is there a tiny rubber thing that is the same color as the cylinder?"
    ]
    for t in texts:
        ref = mod.tokenize(t, punct_to_keep=[";", ","], punct_to_remove=["?", "."])
        assert ["<START>", *tokenize(t), "<END>"] == ref
    ref_vocab = mod.build_vocab(texts, punct_to_keep=[";", ","], punct_to_remove=["?", "."])
    assert build_vocab(tokenize(t) for t in texts) == ref_vocab
    answers = ["yes", "no", "3", "red", "large"]
    assert build_vocab([a] for a in answers) == mod.build_vocab(answers)
    v = build_vocab(tokenize(t) for t in texts)
    ids = mod.encode(mod.tokenize(texts[0] + " zebra", punct_to_keep=[";", ","], punct_to_remove=["?", "."]), v,
                     allow_unk=True)  # fmt: skip
    assert encode_question(texts[0] + " zebra", v) == ids


def test_vocab_starts_with_the_special_tokens_then_sorted():
    v = build_vocab([["b", "a"], ["c", "a"]])
    assert v == {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, "a": 4, "b": 5, "c": 6}
    assert SPECIAL_TOKENS == {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}


def test_clevr_answers_give_32_ids():
    answers = ["yes", "no", *map(str, range(11)), "gray", "red", "blue", "green", "brown", "purple", "cyan"]
    answers += ["yellow", "cube", "sphere", "cylinder", "large", "small", "rubber", "metal"]
    v = build_vocab([a] for a in answers)
    assert len(answers) == 28 and len(v) == 32 and v["0"] == 4  # sorted: "0" < "1" < "10" < "2" …
    assert v["10"] == 6


def test_encode_question_start_end_and_unknown():
    vocab = {"question_token_to_idx": build_vocab([tokenize("Is there a cube?")])}
    q = vocab["question_token_to_idx"]
    assert encode_question("Is there a zebra?", vocab) == [1, q["Is"], q["there"], q["a"], 3, 2]
    assert encode_question("Is there a cube?", q) == [1, q["Is"], q["there"], q["a"], q["cube"], 2]


def test_vocab_hash_depends_on_ids_only():
    a = {"<NULL>": 0, "x": 4}
    assert vocab_hash(a, {"yes": 4}) == vocab_hash(dict(reversed(list(a.items()))), {"yes": 4})
    assert vocab_hash(a, {"yes": 4}) != vocab_hash(a, {"yes": 5})
