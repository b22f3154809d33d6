"""Fuzz the question tokenizer: any text encodes to <START> … <END> with ids inside the vocabulary."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fastfilm.data.tokenize import build_vocab, encode_question, tokenize

VOCAB = {
    "question_token_to_idx": build_vocab(
        tokenize(t)
        for t in ["How many red cubes are there?", "Is there a big sphere; or a cylinder, left of it?"]
    )
}
SIZE = len(VOCAB["question_token_to_idx"])


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_encodes(text):
    tokens = tokenize(text)
    assert all(isinstance(t, str) for t in tokens)
    ids = encode_question(text, VOCAB)
    assert ids[0] == 1 and ids[-1] == 2  # <START> … <END>
    assert all(0 <= i < SIZE for i in ids)
    assert len(ids) == len(tokens) + 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["red", "cubes", "?", ";", ",", ".", " ", "  ", "How", "zebra", "\t", "\n"])))
def test_punctuation_and_whitespace_mixtures(parts):
    text = "".join(parts)
    ids = encode_question(text, VOCAB)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < SIZE for i in ids)
