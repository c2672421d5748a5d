"""Step 2 of the dry run: the model of every pipeline stage built on the meta device, and what it
holds (layers, parameters per GPU and per stage, the mHC recompute's L_r).

A stage is built with the parallel state of one of its ranks (no memory, no init): a fake process
group of N ranks (Megatron's `--fake-process-group` idiom) stands in for the other ranks, so
TP/EP sharding, the stage's layers and its embedding / output layer are Megatron's own. It builds
with the local spec and the build-only settings of `_META_BUILD_SETTINGS`, which hold the same
parameters as the Transformer Engine modules of the real run.
"""

import contextlib
import copy
import io
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_mhc.megatron_patches import MegatronPatch

# Settings the meta build uses instead of the run's: each changes how a module computes or
# communicates, not which parameters it holds (Transformer Engine and CUDA streams are not needed).
_META_BUILD_SETTINGS = dict(
    transformer_impl="local",
    use_cpu_initialization=True,
    init_model_with_meta_device=True,
    perform_initialization=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    bias_gelu_fusion=False,
    bias_swiglu_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    no_persist_layer_norm=True,
    sequence_parallel=False,
    moe_grouped_gemm=False,
    moe_router_enable_expert_bias=False,  # a buffer (created on the current CUDA device)
    moe_token_dispatcher_type="allgather",
    overlap_moe_expert_parallel_comm=False,
    mhc_mlp_high_priority_stream=False,
    mhc_kernel_backend="torch",
)

# Megatron's MLA builds its rotary embedding's frequencies on the current CUDA device whatever
# use_cpu_initialization says: while the stages are built, that is the meta device they are built
# on. Listed in docs/megatron_patches.md.
META_DEVICE_ANSWER = MegatronPatch(
    "dry run: current CUDA device", "torch.cuda", "current_device", ()
)


@contextlib.contextmanager
def meta_build_arguments(args) -> Iterator[None]:
    """The global args the model provider reads, with _META_BUILD_SETTINGS."""
    import megatron.training.global_vars as global_vars

    build_args = copy.copy(args)
    for name, value in _META_BUILD_SETTINGS.items():
        setattr(build_args, name, value)
    saved = global_vars._GLOBAL_ARGS
    global_vars._GLOBAL_ARGS = build_args
    try:
        yield
    finally:
        global_vars._GLOBAL_ARGS = saved


def build_stage_on_meta(args, stage: int):
    """The model chunks rank `stage * N / PP` (TP, CP, EP, DP rank 0 of pipeline stage `stage`)
    would build, on the meta device, as megatron.training.get_model builds them (inside
    `meta_build_arguments`)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.utils import (
        is_pp_first_stage,
        is_pp_last_stage,
        is_vp_first_stage,
        is_vp_last_stage,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_mhc.training.gpt_step import model_provider

    if dist.is_initialized():
        raise RuntimeError(
            "the dry run builds each stage under its own fake process group of "
            f"{args.world_size} ranks: run it in a process without torch.distributed set up"
        )
    ranks_per_stage = args.world_size // args.pipeline_model_parallel_size
    dist.init_process_group(
        "fake", store=FakeStore(), rank=stage * ranks_per_stage, world_size=args.world_size
    )
    try:
        parallel_state.initialize_model_parallel(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
            create_gloo_process_groups=False,
        )
        assert parallel_state.get_pipeline_model_parallel_rank() == stage
        pp = ProcessGroupCollection.use_mpu_process_groups().pp
        vp_size = args.virtual_pipeline_model_parallel_size
        chunks = []
        with (
            torch.device("meta"),
            contextlib.redirect_stdout(io.StringIO()),
            META_DEVICE_ANSWER.replaced(lambda: "meta"),
        ):
            for vp_stage in range(vp_size or 1):
                vp = vp_stage if vp_size else None
                chunks.append(
                    model_provider(
                        pre_process=is_pp_first_stage(pp)
                        and is_vp_first_stage(vp_stage=vp, vp_size=vp_size),
                        post_process=is_pp_last_stage(pp)
                        and is_vp_last_stage(vp_stage=vp, vp_size=vp_size),
                        vp_stage=vp,
                    )
                )
        return chunks
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def is_mhc_module(module) -> bool:
    from megatron_mhc.transformer.hyper_connection import (
        HyperConnectionHead,
        HyperConnectionModule,
    )

    return isinstance(module, (HyperConnectionModule, HyperConnectionHead))


def _decoder(chunk):
    """The chunk's decoder stack (its model unwrapped), None on a chunk without one."""
    return getattr(getattr(chunk, "module", chunk), "decoder", None)


def stage_layers(chunk) -> list:
    stack = _decoder(chunk)
    return list(stack.layers) if stack is not None else []


def recompute_block_size_of(args, chunk) -> int:
    """L_r of the chunk's mHC recompute: the run's, else eq. 20 ('auto') for the chunk's layers
    (what turning the recompute on with 'auto' would give)."""
    from megatron_mhc.transformer.recompute import recompute_block_size

    block = getattr(_decoder(chunk), "recompute_block_size", None)
    return block or recompute_block_size(
        "auto", args.mhc_num_residual_streams, len(stage_layers(chunk))
    )


def count_parameters(args, chunks) -> dict:
    """Parameters one GPU of the stage holds, and the stage holds in all: a TP-sharded
    parameter counts TP times, an expert parameter EP x ETP times (ETP only if also sharded),
    and the output layer's copy of tied embeddings on a later stage not at all."""
    tp = args.tensor_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    ep = args.expert_model_parallel_size
    mhc_ids = {
        id(p)
        for chunk in chunks
        for m in chunk.modules()
        if is_mhc_module(m)
        for p in m.parameters()
    }
    counts = dict(on_gpu=0, mhc_on_gpu=0, expert_on_gpu=0, in_stage=0, mhc_in_stage=0)
    for chunk in chunks:
        tied_copy = None
        if getattr(chunk, "share_embeddings_and_output_weights", False) and not chunk.pre_process:
            output_layer = getattr(chunk, "output_layer", None)
            tied_copy = getattr(output_layer, "weight", None)
        for param in chunk.parameters():
            numel = param.numel()
            counts["on_gpu"] += numel
            sharded = getattr(param, "tensor_model_parallel", False)
            if not getattr(param, "allreduce", True):  # an expert's
                counts["expert_on_gpu"] += numel
                shards = ep * (etp if sharded else 1)
            else:
                shards = tp if sharded else 1
            if param is not tied_copy:
                counts["in_stage"] += numel * shards
            if id(param) in mhc_ids:
                counts["mhc_on_gpu"] += numel
                counts["mhc_in_stage"] += numel * shards
    return counts
