"""The dry run's report: what it found (`DryRunResult`) and the summary `--dry-run` prints, ending
in the line `memory per GPU: X GiB`."""

import argparse
import dataclasses

from megatron_mhc.training.dry_run.memory import MemoryEstimate, StageReport, total_bytes

GIB = 2**30


@dataclasses.dataclass
class DryRunResult:
    """A launch that would start: its checked flags, every stage as built and sized, the most
    loaded stage's memory, what was assumed, and the packages the real run needs."""

    args: argparse.Namespace
    stages: list[StageReport]
    memory: MemoryEstimate
    notes: list[str]
    extras: list[tuple[str, str, bool]]
    num_microbatches: int
    megatron_weight_and_optimizer_bytes: float | None


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.2f} MiB"


def _billions(count: float) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e8 else f"{count / 1e6:.3f} M"


def summary(result: DryRunResult) -> str:
    """The report printed by `--dry-run`."""
    args, memory = result.args, result.memory
    vpp = args.virtual_pipeline_model_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    lines = [
        f"megatron-mhc dry run: the launch would start on {args.world_size} GPUs",
        f"parallel layout: TP={args.tensor_model_parallel_size} "
        f"PP={args.pipeline_model_parallel_size} VPP={vpp or 1} "
        f"EP={args.expert_model_parallel_size} ETP={etp} CP={args.context_parallel_size} "
        f"DP={args.data_parallel_size}"
        + (" SP" if args.sequence_parallel else "")
        + (" distributed-optimizer" if args.use_distributed_optimizer else ""),
        f"tokens per step: {args.global_batch_size * args.seq_length} "
        f"(global batch {args.global_batch_size} x sequence {args.seq_length}; micro-batch "
        f"{args.micro_batch_size}, {result.num_microbatches} micro-batches per step)",
        "stage | layers | params per GPU (mHC) | params in stage (mHC) | L_r | "
        "activations per micro-batch | in flight",
    ]
    for stage in result.stages:
        lines.append(
            f"  {stage.index} | {stage.layers} | {_billions(stage.params_on_gpu)} "
            f"({_billions(stage.mhc_params_on_gpu)}) | {_billions(stage.params_in_stage)} "
            f"({_billions(stage.mhc_params_in_stage)}) | {stage.recompute_block_size or '-'} | "
            f"{_size(stage.activation_bytes_per_microbatch)} without / "
            f"{_size(stage.activation_bytes_per_microbatch_recompute)} with mHC recompute | "
            f"{stage.in_flight_microbatches:g}"
        )
    total = sum(s.params_in_stage for s in result.stages)
    mhc = sum(s.mhc_params_in_stage for s in result.stages)
    per_microbatch = sum(s.activation_bytes_per_microbatch for s in result.stages)
    per_microbatch_recompute = sum(
        s.activation_bytes_per_microbatch_recompute for s in result.stages
    )
    lines += [
        f"parameters in all: {_billions(total)} (mHC {_billions(mhc)})",
        f"activations of one micro-batch, all stages: {per_microbatch / 2**20:.2f} MiB "
        f"without, {per_microbatch_recompute / 2**20:.2f} MiB with the mHC recompute",
        f"memory per GPU, stage {memory.stage} (the most loaded):",
        f"  weights {_size(memory.weights)}, gradients {_size(memory.gradients)}",
        f"  optimizer state {_size(memory.optimizer)}, with the distributed optimizer "
        f"{_size(memory.optimizer_distributed)}",
        f"  activations {_size(memory.activations)} without the mHC recompute, "
        f"{_size(memory.activations_recompute)} with it",
        *(
            [
                "  cross-check, Megatron's theoretical_memory_usage (bf16, even split, no mHC): "
                f"weights + gradients + optimizer state "
                f"{_size(result.megatron_weight_and_optimizer_bytes)}"
            ]
            if result.megatron_weight_and_optimizer_bytes is not None
            else []
        ),
        "  assumptions: bf16 weights when --bf16/--fp16 (HC parameters fp32), gradients as "
        "Megatron accumulates them, Adam state in fp32; activations per "
        "activation_bytes_per_microbatch (megatron_mhc/training/dry_run/memory.py) times the "
        "micro-batches in flight; no CUDA context, allocator slack or communication buffers",
    ]
    for note in result.notes:
        lines.append(f"note: {note}")
    for package, why, here in result.extras:
        lines.append(
            f"the real run needs: {package} ({why}){'' if here else ' - not installed here'}"
        )
    lines.append(f"memory per GPU: {total_bytes(args, memory) / GIB:.2f} GiB")
    return "\n".join(lines)
