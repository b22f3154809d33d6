"""fastfilm: FiLM visual reasoning (Perez et al., AAAI 2018) with fused Triton kernels, DALI and DeepSpeed.

Layers (README, "Layout"), each importing only those below it: `cli` → the jobs at this level (train, evaluate,
predictions, prompt, analyze, init_from, prepare) → `files/` → `data/` | the model (`model`, `gru`; `kernels/`
beside the package) → `core/`. The modules `config`, `errors`, `precision` here are aliases of `core`'s.
"""

__version__ = "0.1.0"
