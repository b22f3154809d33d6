"""Whether the configured kernels can run on this machine: `kernels.mode=triton` without a GPU.

Training, evaluation and every model-folder load ask here before the model (and so `kernels`) is built: Triton's
interpreter must be switched on before `kernels` is imported.
"""

from __future__ import annotations

import os
import sys

import torch

from fastfilm.core.config import Config, ConfigError


def check_kernels_mode(cfg: Config) -> None:
    """`kernels.mode=triton` without a GPU: switch Triton's interpreter on (slow, with a one-line warning) while
    the kernels are not yet imported, or refuse with one line when they were imported without it."""
    if cfg.kernels.mode != "triton" or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "kernels._common" in sys.modules:
        raise ConfigError(
            f"{cfg.source}: kernels.mode: 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before the kernels "
            "are imported (use kernels.mode=reference on a CPU)"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            "fastfilm: warning: kernels=triton without a GPU: the Triton kernels run in Triton's interpreter "
            "(TRITON_INTERPRET=1), far slower than kernels=reference",
            file=sys.stderr,
            flush=True,
        )
