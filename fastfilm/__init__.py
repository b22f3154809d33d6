"""fastfilm: FiLM visual reasoning (Perez et al., AAAI 2018) with fused Triton kernels, DALI and DeepSpeed."""

__version__ = "0.1.0"
