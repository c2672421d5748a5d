#!/usr/bin/env python3
"""Export a megatron-mhc checkpoint as a Hugging Face model directory (docs/hugging_face.md).

    python tools/export_hf.py runs/gpt_tiny_mhc/checkpoints runs/gpt_tiny_mhc/hf [--ckpt-step N]

CHECKPOINT_DIR is a checkpoint directory (the iteration its tracker names, else the newest, or
--ckpt-step N) or one iteration directory: torch_dist of any TP/PP/EP layout, or the torch
format where TP = 1. OUT_DIR (new) gets config.json, model.safetensors, the model code and the
tokenizer that made the training data (the embedded corpus's, the run's --tokenizer-model, or
--tokenizer DIR). A model the exporter does not support is refused before anything is written.
Runs in one process on CPU.
"""

import argparse
import os
import sys

try:
    from megatron_mhc.hf.export import export
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_mhc.hf.export import export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--ckpt-step", type=int, default=None, help="the iteration to export")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a Hugging Face tokenizer directory: the tokenizer that made the training data, "
        "for runs whose checkpoint does not name it (NullTokenizer on pre-tokenized data)",
    )
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint_dir, args.out_dir, args.ckpt_step, args.tokenizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"export_hf.py: {err}", file=sys.stderr)
        return 2
    print(f"export_hf.py: wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
