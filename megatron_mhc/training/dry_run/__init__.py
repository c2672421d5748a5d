"""Dry run of a pretrain_gpt_mhc.py launch on N GPUs, on any machine, in seconds:

    python pretrain_gpt_mhc.py --config FILE --dry-run [--world-size N] [flags]

1. :mod:`.validation` validates the flags exactly as the launch does on N GPUs, with the
   environment a launcher gives rank 0 of N, as on a GPU machine with Transformer Engine (the CPU
   platform and CPU flags of a launch without CUDA are not applied); only the data files are not
   looked at.
2. :mod:`.meta_build` builds the model of every pipeline stage on the meta device (no memory, no
   init) with the parallel state of one rank of that stage, and counts what it holds.
3. :mod:`.memory` estimates the memory per GPU of each stage and of the most loaded one.
4. :mod:`.report` prints the layout, parameters per stage (mHC separately), tokens per step, and
   memory per GPU, then `memory per GPU: X GiB`.

Exit 0 when the launch would start; non-zero with the error otherwise. This module runs the
steps (`dry_run`) and is the entry point of `--dry-run` (`main`).
"""

import argparse
import contextlib
import io
import sys

from megatron_mhc.training.arguments import errors_in_one_line
from megatron_mhc.training.dry_run.memory import (
    StageReport,
    activation_bytes_per_microbatch,
    estimate_memory,
    in_flight_microbatches,
    megatron_weight_and_optimizer_bytes,
)
from megatron_mhc.training.dry_run.meta_build import (
    build_stage_on_meta,
    count_parameters,
    meta_build_arguments,
    recompute_block_size_of,
    stage_layers,
)
from megatron_mhc.training.dry_run.report import DryRunResult, summary
from megatron_mhc.training.dry_run.validation import required_extras, validate_as_on_gpus

__all__ = ["DryRunResult", "dry_run", "main"]


def dry_run(argv: list[str], world_size: int | None = None) -> DryRunResult:
    """Validate `argv` (pretrain_gpt_mhc.py's flags) as a launch on `world_size` GPUs (default:
    the smallest the layout allows) would, and build and size every stage. Raises what the
    launch's checks raise (ValueError, ConfigError, Megatron's AssertionError) when the launch
    would not start."""
    notes: list[str] = []
    args, config = validate_as_on_gpus(argv, world_size, notes)
    # Megatron's constant micro-batch calculator (the batch sizes are checked above).
    num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    stages = []
    with meta_build_arguments(args):
        for stage in range(args.pipeline_model_parallel_size):
            stages.append(_stage_report(args, stage, num_microbatches))
    return DryRunResult(
        args,
        stages,
        estimate_memory(args, stages),
        notes,
        required_extras(args, config),
        num_microbatches,
        megatron_weight_and_optimizer_bytes(args),
    )


def _stage_report(args, stage: int, num_microbatches: int) -> StageReport:
    chunks = build_stage_on_meta(args, stage)
    counts = count_parameters(args, chunks)
    blocks = [recompute_block_size_of(args, c) for c in chunks if stage_layers(c)]
    return StageReport(
        index=stage,
        layers=sum(len(stage_layers(c)) for c in chunks),
        params_on_gpu=counts["on_gpu"],
        mhc_params_on_gpu=counts["mhc_on_gpu"],
        expert_params_on_gpu=counts["expert_on_gpu"],
        params_in_stage=counts["in_stage"],
        mhc_params_in_stage=counts["mhc_in_stage"],
        recompute_block_size=max(blocks, default=None) if counts["mhc_on_gpu"] else None,
        activation_bytes_per_microbatch=activation_bytes_per_microbatch(args, chunks, False),
        activation_bytes_per_microbatch_recompute=activation_bytes_per_microbatch(
            args, chunks, True
        ),
        in_flight_microbatches=in_flight_microbatches(args, stage, num_microbatches),
    )


def main(argv: list[str]) -> int:
    """`pretrain_gpt_mhc.py --dry-run`: print the summary and return 0, or print the error line
    a launch would print and return its exit code (2)."""
    from megatron_mhc.training.launch_checks import launch_error_line

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    errors_in_one_line(pre)  # `--world-size abc`: the launch's one line, no usage block
    pre.add_argument("--world-size", type=int, default=None)
    try:
        world_size = pre.parse_known_args(argv)[0].world_size
        if world_size is not None and world_size < 1:
            raise ValueError(f"--world-size {world_size}: must be >= 1")
        # Megatron's parser prints every argument; the summary says what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            result = dry_run(argv, world_size)
    except (ValueError, AssertionError) as err:
        print(launch_error_line(err), file=sys.stderr)
        return 2
    print(summary(result))
    return 0
