"""megatron-mhc: manifold-constrained hyper-connections (mHC) for Megatron-Core pretraining."""

from setuptools import find_packages, setup

# megatron_mhc/hf: the Hugging Face model, tools/export_hf.py, tools/evaluate_hf.py (5.25 passes
# the KV cache to forward as `cache`).
HF = ["transformers>=5.25,<6", "safetensors>=0.4"]

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
            *HF,  # the tests export and load Hugging Face models
            "cuda-tile>=1.7",
            "matplotlib",
            "ruff==0.17.6",
        ],
        "hf": HF,
        "plots": ["matplotlib"],  # tools/plot_runs.py
        "cutile": ["cuda-tile>=1.7"],
        "te": ["transformer-engine[pytorch]"],
    },
)
