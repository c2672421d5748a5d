"""Checks of a launch's data and tokenizer flags, run before any setup: a dataset prefix or a
tokenizer file that is missing or empty is refused with the flag, the path and what is
expected, instead of failing later inside Megatron's data loaders (an empty ``.bin`` fails
there with ``cannot mmap an empty file``, naming no file)."""

import os
from collections.abc import Sequence
from pathlib import Path

from megatron.core.datasets.utils import get_blend_from_list

# Megatron's tokenizer types and the flags naming their files (megatron.core.tokenizers).
_VOCAB_AND_MERGES = ("GPT2BPETokenizer",)
_VOCAB_ONLY = ("BertWordPieceLowerCase", "BertWordPieceCase")
_MODEL_FILE = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "SFTTokenizer",
)


def check_data_paths(data_path_list: Sequence[str] | None, flag: str = "--data-path") -> None:
    """Raise ``ValueError`` unless every dataset prefix of ``flag`` names a dataset on disk.

    ``data_path_list`` is Megatron's blend list, as parsed from the flag: prefixes
    (``path1 path2``) or weights interleaved with prefixes (``0.3 path1 0.7 path2``). Each
    prefix needs a non-empty ``<prefix>.bin`` and ``<prefix>.idx``, as written by
    ``tools/preprocess_data.py --output-prefix <prefix>``. ``None`` (flag not given) passes.
    """
    if data_path_list is None:
        return
    if len(data_path_list) == 0:
        raise ValueError(f"{flag} is given without a dataset prefix")
    prefixes, _ = get_blend_from_list(list(data_path_list))
    for prefix in prefixes:
        problems = []
        for ext in (".bin", ".idx"):
            path = Path(prefix + ext)
            if not path.is_file():
                problems.append(f"{path} does not exist")
            elif path.stat().st_size == 0:
                problems.append(f"{path} is empty (0 bytes)")
        if problems:
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f"; give the prefix without the extension: {prefix[:-4]}"
            raise ValueError(
                f"{flag} {prefix}: expected a Megatron indexed dataset, a non-empty "
                f"{prefix}.bin and {prefix}.idx (tools/preprocess_data.py --output-prefix "
                f"{prefix} writes them), but {' and '.join(problems)}{hint}"
            )


def _require_file(args, attr: str, flag: str, what: str) -> None:
    path = getattr(args, attr, None)
    if path is None:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} needs {flag} ({what})")
    if not os.path.isfile(path):
        state = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{flag} {path}: {state}, expected {what}")


def _is_local_path(name: str) -> bool:
    """Whether a ``--tokenizer-model`` value means a local path rather than a Hugging Face hub
    id (``org/name`` or ``name``): absolute, relative to ``.``/``~``, or below a directory
    that exists here."""
    if os.path.isabs(name) or name.startswith((".", "~")):
        return True
    parts = Path(name).parts
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_tokenizer_files(args) -> None:
    """Raise ``ValueError`` when a file that ``--tokenizer-type`` reads is missing.

    ``args`` is megatron.training's parsed namespace (``tokenizer_type``, ``tokenizer_model``,
    ``vocab_file``, ``merge_file``, ``vocab_size``). ``HuggingFaceTokenizer`` accepts a hub id
    for ``--tokenizer-model``; it is only checked when it is a local path.
    """
    kind = getattr(args, "tokenizer_type", None)
    if kind in _VOCAB_AND_MERGES or kind in _VOCAB_ONLY:
        _require_file(args, "vocab_file", "--vocab-file", "the tokenizer's vocabulary file")
        if kind in _VOCAB_AND_MERGES:
            _require_file(args, "merge_file", "--merge-file", "the tokenizer's BPE merges file")
    elif kind in _MODEL_FILE:
        _require_file(args, "tokenizer_model", "--tokenizer-model", "the tokenizer model file")
    elif kind == "HuggingFaceTokenizer":
        model = getattr(args, "tokenizer_model", None)
        if model is None:
            raise ValueError(
                "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (a directory "
                "with tokenizer.json, e.g. data/tokenizer, or a Hugging Face hub id)"
            )
        if not os.path.exists(model) and _is_local_path(model):
            raise ValueError(
                f"--tokenizer-model {model}: does not exist, expected a directory with the "
                "tokenizer's files (tokenizer.json, tokenizer_config.json), e.g. data/tokenizer"
            )
        for attr, flag in (("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")):
            if getattr(args, attr, None) is not None:
                _require_file(args, attr, flag, "a tokenizer file")
    elif kind == "NullTokenizer" and not getattr(args, "vocab_size", None):
        raise ValueError(
            "--tokenizer-type NullTokenizer needs --vocab-size (the number of token ids; the "
            "end-of-document id is vocab_size - 1), e.g. --vocab-size 8192 for data/tokenizer"
        )
