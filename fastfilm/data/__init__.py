"""The data layer: CLEVR-format synthetic data (`synth`), the cache `prep` writes, the DALI loader that reads it
(and its torch.utils.data twin).

It imports `fastfilm.core` only (never the model, `kernels`, the model files or a job): the loader knows files, not models.
"""

from __future__ import annotations

from fastfilm.core.errors import DataError
from fastfilm.data import torch_loader  # noqa: F401  (registers data.loader=torch with build_loader)
from fastfilm.data.loader import Loader, build_loader, loader_for
from fastfilm.data.prep import load_split, load_vocab, prepare

__all__ = ["DataError", "Loader", "build_loader", "load_split", "load_vocab", "loader_for", "prepare"]
