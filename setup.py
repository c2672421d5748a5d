"""megatron-mhc: manifold-constrained hyper-connections (mHC) for Megatron-Core pretraining."""

from setuptools import find_packages, setup

setup(
    name="megatron-mhc",
    version="0.3.0",
    description="Manifold-constrained hyper-connections (mHC) for Megatron-Core pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_mhc", "megatron_mhc.*"]),
    install_requires=[
        "megatron-core==0.19.2",
        "torch",
        "pyyaml",
        "psutil",
        "omegaconf",
        "tensorboard",
        "tokenizers",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "transformers",
            "cuda-tile>=1.7",
            "matplotlib",
            "ruff==0.17.6",
        ],
        "plots": ["matplotlib"],  # tools/plot_runs.py
        "cutile": ["cuda-tile>=1.7"],
        "te": ["transformer-engine[pytorch]"],
    },
)
