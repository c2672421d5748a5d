#!/usr/bin/env python3
"""Convert megatron-mhc torch_dist checkpoints between versions (see docs/migration.md).

    # a checkpoint written before the HC modules took Megatron's slot names
    python tools/convert_checkpoint.py upgrade runs/old/checkpoints runs/old/checkpoints-upgraded
    # for Megatron-LM main's native mHC (0.20), and back
    python tools/convert_checkpoint.py to-megatron-main SRC DST --num-residual-streams 4
    python tools/convert_checkpoint.py from-megatron-main SRC DST --num-residual-streams 4

SRC is a checkpoint directory (every iter_* in it is converted and the
latest_checkpointed_iteration.txt tracker copied) or one iteration directory. DST must not
exist; SRC is never modified. Runs in one process on CPU, no GPU or torch.distributed needed.
"""

import argparse
import os
import sys

try:
    import megatron_mhc.checkpoint_conversion as conversion
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import megatron_mhc.checkpoint_conversion as conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["upgrade", "to-megatron-main", "from-megatron-main"])
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument(
        "--num-residual-streams",
        type=int,
        default=None,
        help="n (mhc_num_residual_streams); needed for the Megatron-LM main conversions",
    )
    args = parser.parse_args(argv)
    try:
        if args.direction == "upgrade":
            conversion.upgrade_checkpoint(args.source, args.destination)
        else:
            if args.num_residual_streams is None or args.num_residual_streams < 1:
                raise ValueError(
                    f"--num-residual-streams={args.num_residual_streams!r}: {args.direction} "
                    "needs the model's mhc_num_residual_streams (an integer >= 1)"
                )
            convert = (
                conversion.convert_to_megatron_main
                if args.direction == "to-megatron-main"
                else conversion.convert_from_megatron_main
            )
            convert(args.source, args.destination, args.num_residual_streams)
    except (ValueError, FileNotFoundError) as err:
        print(f"convert_checkpoint.py: {err}", file=sys.stderr)
        return 2
    print(f"convert_checkpoint.py: wrote {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
