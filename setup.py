"""fastfilm: FiLM (Perez et al., AAAI 2018) as a mixed-precision trainer with fused Triton kernels."""

from setuptools import find_packages, setup

setup(
    name="fastfilm",
    version="0.1.0",
    description="FiLM visual reasoning, faithful to the paper, with fused Triton kernels, DALI and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastfilm", "fastfilm.*", "kernels", "kernels.*"]),
    install_requires=[
        # torch is pinned by the Makefile (2.13.0); any torch >= 2.11 works (the GPU image has 2.11).
        "torch>=2.11",
        "triton>=3.6",
        "nvidia-dali-cuda130>=2.0",
        "deepspeed>=0.17,<0.20",  # the ZeRO checkpoint allow-list (fastfilm/files/checkpoint.py) is checked for 0.17-0.19
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
        "tensorboard",
        "h5py",  # the original code's feature files (`fastfilm prep --features-h5`)
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "pytest-timeout",
            "pytest-xdist",
            "hypothesis",
            "ruff",
            "import-linter",
        ],
        "analysis": ["matplotlib", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fastfilm=fastfilm.cli:main"]},
)
