"""`fastfilm prep` as a job: the data layer's `prep`, with `--vocab-from` also reading model files.

`fastfilm.data.prep` reads a vocabulary from a vocab.json or a folder holding one (a cache, an exported model, a
checkpoint tag); a run folder (its `best` checkpoint's vocab.json) and a checkpoint of the original code are model
files (`fastfilm.files`), so they are read here and handed down as `prepare`'s `read_vocab`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fastfilm.core.errors import DataError
from fastfilm.data import prep as data_prep


def vocab_source_file(path: str) -> str:
    """The file `--vocab-from PATH` reads: PATH, PATH/vocab.json, or a run folder's best checkpoint's vocab.json."""
    file = data_prep.vocab_source_file(path)
    if os.path.isdir(path) and not os.path.isfile(file):
        from fastfilm.files.checkpoint import CheckpointError, find_checkpoint

        try:
            file = os.path.join(find_checkpoint(path, "best"), "vocab.json")
        except CheckpointError:
            pass
    return file


def read_vocab_source(path: str) -> tuple[str, dict[str, Any]]:
    """The vocabulary `--vocab-from` names, as (the file read, the vocabulary): a vocab.json (fastfilm's, or the
    original's with program tokens), a folder holding one (a cache, an exported model, a checkpoint tag), a run
    folder (its `best` checkpoint's), or a checkpoint of the original code."""
    file = vocab_source_file(path)
    if file.endswith(".json") or not os.path.isfile(file):
        return data_prep.read_vocab_source(file)
    from fastfilm.files.checkpoint import CheckpointError
    from fastfilm.files.original import read_original_checkpoint

    try:
        raw = read_original_checkpoint(file)["vocab"]
    except CheckpointError as e:
        raise DataError(str(e)) from None
    return file, data_prep.check_vocab(raw, file)


def prepare(clevr_dir: str, out_dir: str, **options: Any) -> dict[str, Any]:
    """`fastfilm.data.prep.prepare` (same options and summary) with `vocab_from` read by `read_vocab_source`."""
    return data_prep.prepare(clevr_dir, out_dir, read_vocab=read_vocab_source, **options)


def run(args: argparse.Namespace) -> int:
    """`fastfilm prep`: `fastfilm.data.prep.run` with `--vocab-from` read by `read_vocab_source`."""
    return data_prep.run(args, read_vocab=read_vocab_source)
