"""The errors a user can cause, and the one wrapper that turns them into one line on stderr and an exit status.

Every error that comes from what a user gave (a config, a data set, a checkpoint, a model folder, an option)
derives from `FastfilmError`; its message names the file, line or key and what was expected. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn


class FastfilmError(Exception):
    """Something the user can fix; `label` prefixes the stderr line, `exit_status` is the command's status."""

    label = "error"
    exit_status = 2


class UsageError(FastfilmError, ValueError):
    """A command-line option or an input file does not fit the command (e.g. an image that cannot be read)."""


class DataError(FastfilmError):
    """Bad or missing input data or cache; the message names the file (and the question or image index)."""

    label = "data error"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one stderr line naming the option and pointing at --help; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def with_one_line_errors(fn: Callable[[], int | None]) -> int | None:
    """Run a command; a `FastfilmError` becomes `fastfilm: <label>: <message>` on stderr and its exit status."""
    try:
        return fn()
    except FastfilmError as e:
        _close_progress_bars()
        print(f"fastfilm: {e.label}: {e}", file=sys.stderr)
        return e.exit_status


def progress_off() -> bool:
    """Whether TQDM_DISABLE turns progress bars off: tqdm reads it only for bars that do not pass `disable`
    themselves, so fastfilm's bars that do (training, eval, features) ask here."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _close_progress_bars() -> None:
    """Close the tqdm bars an error left open (e.g. training's epoch bar), so the error line starts a line."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def check_model_cache(cache: str, folder: str) -> None:
    """Refuse, with the way out, a model whose config's data.cache is not on this machine (no --cache given)."""
    if not os.path.isdir(cache):
        raise UsageError(
            f"{folder}/config.json: data.cache '{cache}' is not a folder here: pass --cache CACHE (a cache prepared "
            "with this model's vocabulary, e.g. `fastfilm prep --vocab-from MODEL_DIR`)"
        )


def check_output_file(path: str, option: str) -> None:
    """Refuse, before any work, an output file that could not be written: `path` is a folder, or a file stands
    where one of its folders would be (missing folders are made when the file is written)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder (expected a file name)")
    _check_parents(path, option)


def check_output_folder(path: str, option: str) -> None:
    """Refuse, before any work, an output folder that is a file, or lies under a file."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path}: exists and is not a folder")
    _check_parents(path, option)


def _check_parents(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: {parent} is a file, not a folder")
