"""The data layer: CLEVR-format synthetic data (`synth`), preprocessing into a cache (`prep`), the DALI loader.

The loader knows files, not models: it yields dicts of tensors (`image`, `question`, `length`, `answer`,
`family`, `index`); `load_vocab` gives the vocabulary sizes the model needs.
"""

from __future__ import annotations

from fastfilm.core.errors import FastfilmError


class DataError(FastfilmError):
    """Bad or missing input data or cache; the message names the file (and the question or image index)."""

    label = "data error"


from fastfilm.data.loader import Loader, build_loader, loader_for  # noqa: E402
from fastfilm.data.prep import load_split, load_vocab, prepare  # noqa: E402

__all__ = ["DataError", "Loader", "build_loader", "load_split", "load_vocab", "loader_for", "prepare"]
