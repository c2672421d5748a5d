"""Step 3 of the dry run: memory per GPU of each built stage (weights, gradients, optimizer
state, activations of the micro-batches in flight) and of the most loaded one.

Weights, gradients and optimizer state follow from the parameters the meta build counted; the
activations from `activation_bytes_per_microbatch`, Megatron's theoretical_memory_usage formula
with the sizes of this model and the mHC terms, times the micro-batches the pipeline schedule
keeps in flight. Megatron's own figure for the weights and optimizer state is a cross-check.
"""

import copy
import dataclasses
import math

from megatron_mhc.training.dry_run.meta_build import (
    is_mhc_module,
    recompute_block_size_of,
    stage_layers,
)


@dataclasses.dataclass
class StageReport:
    """One pipeline stage as built: what one GPU of the stage holds, and what the stage's model
    holds in all (TP / EP shards together)."""

    index: int
    layers: int
    params_on_gpu: int
    mhc_params_on_gpu: int
    expert_params_on_gpu: int
    params_in_stage: int
    mhc_params_in_stage: int
    recompute_block_size: int | None  # L_r of the "with mHC recompute" figure
    activation_bytes_per_microbatch: float
    activation_bytes_per_microbatch_recompute: float
    in_flight_microbatches: float


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per GPU of the most loaded stage. Weights in the run's precision (the fp32 HC
    parameters stay fp32 in a bf16 model); gradients in fp32 when Megatron accumulates them in
    fp32, and for the fp32 parameters always (a gradient buffer takes its parameter's dtype);
    Adam's two fp32 moments (SGD: one) plus fp32 main weights in mixed precision; the
    distributed optimizer shards the optimizer state over the data-parallel ranks (expert-data-
    parallel for expert parameters), as compute_weight_and_optimizer_memory does."""

    weights: float
    gradients: float
    optimizer: float
    optimizer_distributed: float
    activations: float
    activations_recompute: float
    stage: int


def activation_bytes_per_microbatch(args, chunks, recompute: bool) -> float:
    """Bytes autograd keeps for backward for one micro-batch on one GPU of the stage.

    Per layer, in units of C = s*b*h activation elements (s: sequence / CP, b: micro-batch,
    h: hidden; 2 bytes in bf16/fp16, 4 in fp32), after Korthikanti et al. 2022 (Megatron's
    theoretical_memory_usage) with the sizes of this model:
      attention: norm input 1, QKV input 1, q/k/v (q + 2 kv)/h, context q/h, and either the
        softmax probabilities a*s/h (unfused attention of the local spec) or the fp32
        log-sum-exp (flash / fused attention of Transformer Engine);
      dense MLP: norm input 1, FC1 input 1, FC1 output f'/h (2f with SwiGLU), FC2 input f/h;
      MoE: norm input 1, router input 1, per routed copy (top-k) the expert input 1, FC1 output
        and FC2 input, the unpermuted output 1; the shared expert's FC1 output and FC2 input;
        the router's fp32 logits, probabilities and scores (3 E floats per token);
      dropout masks (1 byte per element) only where a dropout probability is non-zero.
    Tensor-parallel regions (q/k/v, context, probabilities, FC outputs) are divided by TP,
    the rest only with sequence parallelism.
    mHC, per hyper-connection module: its n-stream input n (kept per block of L_r layers
    instead with the recompute), the sublayer output 1 (for dH_post), and the fp32 mappings
    (2n^2 + 4n + 1 floats per token: projection, rms, H_pre, H_post, H_res).
    Stage ends: token ids (int64) on the first stage, final norm input 1 and output-layer
    input 1 and the fp32 logits s*b*V/TP on the last.
    """
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.moe_layer import MoELayer

    tp = args.tensor_model_parallel_size
    sp = tp if args.sequence_parallel else 1
    s = args.seq_length / args.context_parallel_size
    b = args.micro_batch_size
    h = args.hidden_size
    elem = 2 if (args.bf16 or args.fp16) else 4
    unit = s * b * h * elem  # one C
    heads = args.num_attention_heads
    kv_channels = args.kv_channels or h // heads
    groups = args.num_query_groups if args.group_query_attention else heads
    q_size, kv_size = heads * kv_channels, groups * kv_channels
    unfused = args.transformer_impl == "local" or args.attention_backend.name == "unfused"
    etp = args.expert_tensor_parallel_size or tp
    glu = 2 if args.swiglu else 1
    masks = s * b * h / sp if args.hidden_dropout > 0 else 0.0

    def ffn_units(ffn, shards):  # FC1 output and FC2 input
        return (glu + 1) * ffn / h / shards

    total = 0.0
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        layers = stage_layers(chunk)
        for layer in layers:
            attention = getattr(layer, "self_attention", None)
            if attention is not None and not isinstance(attention, IdentityOp):
                units = 2 / sp + (q_size + 2 * kv_size + q_size) / h / tp
                if unfused:
                    units += heads * s / h / tp
                    if args.attention_dropout > 0:
                        units += heads * s / h / tp * (1 + 1 / elem)
                total += units * unit + masks + (4 * heads * s * b / tp if not unfused else 0)
            mlp = getattr(layer, "mlp", None)
            if isinstance(mlp, MoELayer):
                # Each routed copy of a token: expert input, FFN, unpermuted output; the
                # router's fp32 logits, probabilities and scores per expert.
                k = args.moe_router_topk
                units = 2 / sp + k * (2 + ffn_units(args.moe_ffn_hidden_size, etp))
                if args.moe_shared_expert_intermediate_size:
                    units += ffn_units(args.moe_shared_expert_intermediate_size, tp)
                total += units * unit + masks + 3 * 4 * s * b * args.num_experts / sp
            elif mlp is not None and not isinstance(mlp, IdentityOp):
                total += (2 / sp + ffn_units(args.ffn_hidden_size, tp)) * unit + masks
        hc_modules = [m for m in model.modules() if is_mhc_module(m)]
        if hc_modules:
            n = args.mhc_num_residual_streams
            per_module = (1 / sp) * unit + (2 * n * n + 4 * n + 1) * 4 * s * b / sp
            stream_states = len(hc_modules) * n
            if recompute and layers:
                stream_states = math.ceil(len(layers) / recompute_block_size_of(args, chunk)) * n
            total += len(hc_modules) * per_module + stream_states * unit / sp
        if getattr(model, "pre_process", False):
            total += 8 * s * b + masks
        if getattr(model, "post_process", False):
            total += 2 * unit / sp + 4 * s * b * args.padded_vocab_size / tp
    return total


def in_flight_microbatches(args, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations stage `stage` holds at its peak: min(PP - stage, M)
    in 1F1B; with VPP chunks, the interleaved schedule's warm-up plus one, in chunks, divided by
    the chunks per rank (Megatron's interleaved memory penalty on the first stage)."""
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    if pp == 1:
        return 1.0
    if vpp is None:
        return float(min(pp - stage, num_microbatches))
    chunks = min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, num_microbatches * vpp)
    return chunks / vpp


def estimate_memory(args, stages: list[StageReport]) -> MemoryEstimate:
    """The MemoryEstimate of the most loaded stage: the one whose total_bytes is largest."""
    mixed = args.bf16 or args.fp16
    dp = args.data_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    expert_dp = args.world_size // (
        etp * args.expert_model_parallel_size * args.pipeline_model_parallel_size
    )
    moments = 8 if args.optimizer == "adam" else 4
    grad_bytes = 4 if (args.accumulate_allreduce_grads_in_fp32 or not mixed) else 2
    best = None
    for stage in stages:
        low_precision = stage.params_on_gpu - stage.mhc_params_on_gpu if mixed else 0
        fp32 = stage.params_on_gpu - low_precision
        weights = 2 * low_precision + 4 * fp32
        gradients = grad_bytes * low_precision + 4 * fp32
        optimizer = moments * stage.params_on_gpu + 4 * low_precision
        expert_share = stage.expert_params_on_gpu / max(stage.params_on_gpu, 1)
        optimizer_distributed = optimizer * ((1 - expert_share) / dp + expert_share / expert_dp)
        activations = stage.activation_bytes_per_microbatch * stage.in_flight_microbatches
        activations_recompute = (
            stage.activation_bytes_per_microbatch_recompute * stage.in_flight_microbatches
        )
        estimate = MemoryEstimate(
            weights,
            gradients,
            optimizer,
            optimizer_distributed,
            activations,
            activations_recompute,
            stage.index,
        )
        if best is None or total_bytes(args, estimate) > total_bytes(args, best):
            best = estimate
    return best


def total_bytes(args, estimate: MemoryEstimate) -> float:
    """Memory per GPU with the run's own choices (distributed optimizer, mHC recompute)."""
    optimizer = (
        estimate.optimizer_distributed if args.use_distributed_optimizer else estimate.optimizer
    )
    recompute = args.mhc_recompute_layer_num is not None
    activations = estimate.activations_recompute if recompute else estimate.activations
    return estimate.weights + estimate.gradients + optimizer + activations


def megatron_weight_and_optimizer_bytes(args) -> float | None:
    """Megatron's theoretical_memory_usage figure for the weights, gradients and optimizer state
    of the most loaded shard (bf16 training assumed, even pipeline split, no mHC parameters);
    None for a HybridModel, which it does not cover."""
    from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory

    if args.hybrid_layer_pattern is not None:
        return None
    # It sets num_query_groups on the namespace it is given.
    return compute_weight_and_optimizer_memory(copy.copy(args))
