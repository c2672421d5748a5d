#!/usr/bin/env python3
"""Turn a jsonl corpus into Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

One document per line: a JSON object whose ``--json-key`` field (default ``text``) is the
document's text. ``.gz``, ``.xz`` and ``.bz2`` inputs are read directly. Each document is
tokenized with a Hugging Face ``tokenizers`` file (``--tokenizer-file``, default: the byte-level
BPE shipped in ``data/tokenizer/tokenizer.json``) and written with
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` as one sequence; with
``--append-eod`` the end-of-document token is appended. The result is what megatron.training
reads with ``--data-path PREFIX``.

Examples::

    python tools/preprocess_data.py --input my.jsonl.gz --output-prefix out/my_corpus \\
        --append-eod --workers 2
    # then: --data-path out/my_corpus --tokenizer-type NullTokenizer --vocab-size 8192
    #   or: --data-path out/my_corpus --tokenizer-type HuggingFaceTokenizer \\
    #       --tokenizer-model data/tokenizer

Errors (missing file, bad JSON, missing key, non-string value, an input without any text) are
reported with the file name (and line number) and exit with status 2; no output file is left
behind, nor a folder the run created for ``--output-prefix``.
"""

import argparse
import logging
import os
import sys

try:
    import megatron_mhc  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mhc.data.paths import default_tokenizer_file  # noqa: E402
from megatron_mhc.data.preprocess import preprocess_jsonl  # noqa: E402
from megatron_mhc.data.tokenizer import EOD_TOKEN  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="jsonl -> Megatron indexed dataset (.bin/.idx)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="input FILE.jsonl[.gz|.xz|.bz2]")
    p.add_argument("--json-key", default="text", help="field of each JSON object to tokenize")
    p.add_argument(
        "--output-prefix",
        required=True,
        help="writes PREFIX.bin and PREFIX.idx (directories are created); train with "
        "--data-path PREFIX",
    )
    p.add_argument(
        "--tokenizer-file",
        default=str(default_tokenizer_file()),
        help=f"Hugging Face tokenizers file (tokenizer.json) with a {EOD_TOKEN} token",
    )
    p.add_argument(
        "--append-eod",
        action="store_true",
        help=f"append the end-of-document token ({EOD_TOKEN}) to every document",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress logs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.workers < 1:
        print(f"error: --workers {args.workers}: must be >= 1", file=sys.stderr)
        return 2
    try:
        preprocess_jsonl(
            args.input,
            args.output_prefix,
            tokenizer_file=args.tokenizer_file,
            json_key=args.json_key,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (FileNotFoundError, ValueError) as e:  # JsonlError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"--data-path {os.path.abspath(args.output_prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
