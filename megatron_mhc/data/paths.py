"""Locations of the shipped corpus and tokenizer (``data/``) and of the dataset cache."""

import os
from pathlib import Path


def data_dir() -> Path:
    """The ``data/`` directory holding the corpus and tokenizer.

    ``$MEGATRON_MHC_DATA_DIR`` overrides it (for installs where ``data/`` is not next to the
    package); otherwise it is ``<repository>/data``.
    """
    env = os.environ.get("MEGATRON_MHC_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data"


def default_corpus_file() -> Path:
    """The embedded corpus: gzip-compressed jsonl, one ``{"id", "text"}`` per line."""
    return data_dir() / "corpus" / "kjv.jsonl.gz"


def default_tokenizer_dir() -> Path:
    """The shipped tokenizer's directory: ``--tokenizer-model`` for ``HuggingFaceTokenizer``."""
    return data_dir() / "tokenizer"


def default_tokenizer_file() -> Path:
    """The shipped tokenizer in Hugging Face ``tokenizers`` form (``tokenizer.json``)."""
    return default_tokenizer_dir() / "tokenizer.json"


def default_cache_dir() -> Path:
    """``$MEGATRON_MHC_CACHE_DIR``, else ``$XDG_CACHE_HOME/megatron_mhc`` (``~/.cache/...``)."""
    env = os.environ.get("MEGATRON_MHC_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "megatron_mhc"
