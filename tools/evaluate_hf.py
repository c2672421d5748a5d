#!/usr/bin/env python3
"""An exported model's loss and perplexity on Megatron's validation split (docs/hugging_face.md).

    python tools/evaluate_hf.py runs/gpt_tiny_mhc/hf [--data-path PREFIX]

OUT_DIR is a directory tools/export_hf.py wrote. The samples come from Megatron's own dataset
index, built with the run's settings (split, sequence length, seed, sample counts): by default
those Megatron's evaluation at the exported iteration read, so the loss is comparable with the
run's "validation loss at iteration N". --data-path evaluates another dataset prefix through
the same index (the run used the embedded corpus: that one by default); --first-sample and
--samples choose another window.
"""

import argparse
import os
import sys

try:
    from megatron_mhc.hf.evaluate import validation_loss
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_mhc.hf.evaluate import validation_loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--data-path", default=None, help="a Megatron dataset prefix")
    parser.add_argument("--first-sample", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        result = validation_loss(args.out_dir, args.data_path, args.first_sample, args.samples)
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate_hf.py: {err}", file=sys.stderr)
        return 2
    last = result.first_sample + result.num_samples - 1
    print(
        f"evaluate_hf.py: validation samples {result.first_sample}..{last} "
        f"({result.tokens} tokens) | lm loss {result.loss:.6E} | perplexity {result.perplexity:.6E}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
