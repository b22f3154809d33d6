"""Whether the configured kernels can run on this machine: `kernels.mode=triton` without a GPU.

Training, evaluation and every model-folder load ask here before the model (and so `kernels`) is built: Triton's
interpreter must be switched on before `triton` is imported.
"""

from __future__ import annotations

import os
import sys

import torch

from fastfilm.core.config import Config, ConfigError


def check_kernels_mode(cfg: Config) -> None:
    """`kernels.mode=triton` without a GPU: switch Triton's interpreter on (slow, with a one-line warning) while
    triton is not yet imported, or refuse with one line when it was imported without it."""
    if cfg.kernels.mode != "triton" or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    # triton itself, not only our kernels: the library's own @triton.jit functions (tl.zeros, tl.sum, ...) are
    # made for the compiler or the interpreter when `triton` is imported, and compiled ones fail in an interpreted
    # kernel ("Cannot call @triton.jit'd outside of the scope of a kernel"; triton 3.6 and 3.9 alike).
    if "triton" in sys.modules:  # (the kernels import it)
        raise ConfigError(
            f"{cfg.source}: kernels.mode: 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is "
            "imported (triton was imported already in this process; use kernels.mode=reference on a CPU)"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            "fastfilm: warning: kernels=triton without a GPU: the Triton kernels run in Triton's interpreter "
            "(TRITON_INTERPRET=1), far slower than kernels=reference",
            file=sys.stderr,
            flush=True,
        )
