"""Question tokenisation exactly as the original FiLM code (`vr/preprocess.py`, `scripts/preprocess_questions.py`).

The original splits on single spaces after putting a space before `;` and `,` and deleting `?` and `.`; it does
NOT lower-case ("What" and "what" are different tokens — that is how its 93-word CLEVR vocabulary comes about),
and a double space gives an empty token. We keep all of that, so vocabularies and token ids match the original.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
SPECIAL_TOKENS: dict[str, int] = {NULL: 0, START: 1, END: 2, UNK: 3}
PUNCT_TO_KEEP = (";", ",")
PUNCT_TO_REMOVE = ("?", ".")


def tokenize(text: str) -> list[str]:
    """The word tokens of a question, without START/END (the original's `tokenize` with CLEVR's settings)."""
    for p in PUNCT_TO_KEEP:
        text = text.replace(p, f" {p}")
    for p in PUNCT_TO_REMOVE:
        text = text.replace(p, "")
    return text.split(" ")


def build_vocab(token_lists: Iterable[Iterable[str]]) -> dict[str, int]:
    """token → id: the 4 special tokens, then every token seen, sorted (the original's `build_vocab`).

    Questions: pass `tokenize(q)` for each question. Answers: pass `[answer]` for each one — the whole answer
    is one token (the original splits answers on spaces here but then looks up the whole answer, which only
    works for one-word answers such as CLEVR's; for those both give the same ids).
    """
    seen: set[str] = set()
    for tokens in token_lists:
        seen.update(tokens)
    vocab = dict(SPECIAL_TOKENS)
    for tok in sorted(seen):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab


def encode_tokens(tokens: Iterable[str], token_to_idx: Mapping[str, int]) -> tuple[list[int], int]:
    """START + ids + END for word tokens (unknown → UNK); also how many were unknown."""
    ids, unknown = [SPECIAL_TOKENS[START]], 0
    unk = token_to_idx.get(UNK, SPECIAL_TOKENS[UNK])
    for tok in tokens:
        i = token_to_idx.get(tok)
        if i is None:
            i, unknown = unk, unknown + 1
        ids.append(i)
    ids.append(SPECIAL_TOKENS[END])
    return ids, unknown


def encode_question(text: str, vocab: Mapping) -> list[int]:
    """A question as model input ids: `<START> words… <END>`, unknown words → `<UNK>`.

    `vocab` is the dict from `load_vocab` (or an exported model's vocab.json) or a plain token → id mapping.
    """
    token_to_idx = vocab.get("question_token_to_idx", vocab)
    return encode_tokens(tokenize(text), token_to_idx)[0]


def vocab_hash(question_token_to_idx: Mapping[str, int], answer_token_to_idx: Mapping[str, int]) -> str:
    """A content hash of both vocabularies (sha256 of their canonical JSON): equal hash ⇔ equal token ids."""
    blob = json.dumps(
        {"question": dict(question_token_to_idx), "answer": dict(answer_token_to_idx)},
        sort_keys=True,
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
