"""Dry run of a pretrain_gpt_mhc.py launch on N GPUs, on any machine, in seconds:

    python pretrain_gpt_mhc.py --config FILE --dry-run [--world-size N] [flags]

1. Validates the flags exactly as the launch does on N GPUs: `parse_and_check_arguments` (Megatron's
   parsing and validation plus megatron-mhc's checks) with the environment a launcher gives rank 0
   of N (WORLD_SIZE, RANK, LOCAL_RANK). Only the data files are not looked at (`check_data=False`;
   a tokenizer whose files are absent gives an assumed vocabulary). The CPU platform and CPU flags
   of a launch without CUDA are not applied: the flags are checked as on a GPU machine with
   Transformer Engine (`_as_on_gpu_machine` says what that assumes).
2. Builds the model of every pipeline stage on the meta device (no memory, no init) with the
   parallel state of one rank of that stage: a fake process group of N ranks (Megatron's
   `--fake-process-group` idiom) stands in for the other ranks, so TP/EP sharding, the stage's
   layers and its embedding / output layer are Megatron's own. It builds with the local spec and
   the build-only settings of `_META_BUILD_SETTINGS`, which hold the same parameters as the
   Transformer Engine modules of the real run.
3. Prints the layout, parameters per stage (mHC separately), tokens per step, and memory per GPU
   (`estimate_memory`), then `memory per GPU: X GiB`.

Exit 0 when the launch would start; non-zero with the error otherwise.
"""

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import math
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from packaging.version import Version

from megatron_mhc.megatron_patches import MegatronPatch, check_patches

GIB = 2**30
# The GPU the flags are validated for: the Hopper machines of docs/slurm.md.
ASSUMED_COMPUTE_CAPABILITY = (9, 0)
# The Transformer Engine release the GPU machines are assumed to have (its version checks in
# Megatron's validation pass for it).
ASSUMED_TE_VERSION = "2.14.0"
# Vocabulary when the tokenizer's files are not here (the placeholder paths of the paper-size
# configs): DeepSeek-V3's, the tokenizer of the mHC paper's MoE models.
ASSUMED_VOCAB_SIZE = 129280

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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


# ---- the environment of a launch on N GPUs ------------------------------------------------------


@contextlib.contextmanager
def _launch_environment(argv: list[str], world_size: int) -> Iterator[None]:
    """sys.argv and the variables a launcher sets for rank 0 of `world_size` (Megatron reads
    both while parsing)."""
    env = dict(
        WORLD_SIZE=str(world_size),
        RANK="0",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(min(world_size, 8)),  # nodes of 8 GPUs, as in docs/slurm.md
    )
    saved_env = {key: os.environ.get(key) for key in env}
    saved_argv = sys.argv
    os.environ.update(env)
    sys.argv = ["pretrain_gpt_mhc.py", *argv]
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _transformer_engine_rope(*_args, **_kwargs):
    raise RuntimeError("Transformer Engine's fused RoPE stands in for validation only")


# What Megatron's validation asks of the machine, answered as a Hopper GPU machine answers it
# while the dry run parses: the device capability (grouped GEMM) and the architecture (TP/CP > 1).
# Listed in docs/megatron_patches.md.
GPU_ANSWERS = (
    (
        MegatronPatch(
            "dry run: GPU capability", "torch.cuda", "get_device_capability", ("device",)
        ),
        lambda device=None: ASSUMED_COMPUTE_CAPABILITY,
    ),
    (
        MegatronPatch(
            "dry run: GPU architecture",
            "megatron.training.arguments",
            "get_device_arch_version",
            (),
        ),
        lambda: ASSUMED_COMPUTE_CAPABILITY[0],
    ),
)
# Megatron's MLA builds its rotary embedding's frequencies on the current CUDA device whatever
# use_cpu_initialization says: while the stages are built, that is the meta device they are built
# on. Listed in docs/megatron_patches.md.
META_DEVICE_ANSWER = MegatronPatch(
    "dry run: current CUDA device", "torch.cuda", "current_device", ()
)
# The same for Transformer Engine when it is not installed here: its version (Megatron's version
# checks) and its fused RoPE (TransformerConfig refuses apply_rope_fusion without it).
TRANSFORMER_ENGINE_ANSWERS = (
    (
        MegatronPatch("dry run: Transformer Engine version", "megatron.core.utils", "_te_version"),
        Version(ASSUMED_TE_VERSION),
    ),
    (
        MegatronPatch(
            "dry run: Transformer Engine's fused RoPE",
            "megatron.core.models.common.embeddings.rope_utils",
            "fused_apply_rotary_pos_emb",
        ),
        _transformer_engine_rope,
    ),
)


@contextlib.contextmanager
def _as_on_gpu_machine(notes: list[str]) -> Iterator[None]:
    """GPU_ANSWERS, and TRANSFORMER_ENGINE_ANSWERS unless Transformer Engine is installed, in
    place inside the block (all checked before any is made)."""
    answers = GPU_ANSWERS
    transformer_engine = "the installed Transformer Engine"
    if not _installed("transformer_engine"):
        answers += TRANSFORMER_ENGINE_ANSWERS
        transformer_engine = f"Transformer Engine {ASSUMED_TE_VERSION}"
    check_patches(patch for patch, _ in answers)
    with contextlib.ExitStack() as stack:
        for patch, answer in answers:
            stack.enter_context(patch.replaced(answer))
        notes.append(
            f"validated as on a GPU machine with compute capability "
            f"{'.'.join(map(str, ASSUMED_COMPUTE_CAPABILITY))} and {transformer_engine}"
        )
        yield


def _padded_vocabulary(args, notes: list[str]) -> None:
    """args.padded_vocab_size as the launch's tokenizer gives it; when the tokenizer's files are
    not on this machine, --vocab-size (or ASSUMED_VOCAB_SIZE) padded as Megatron pads it."""
    from megatron.core.tokenizers.utils.build_tokenizer import (
        build_tokenizer,
        vocab_size_with_padding,
    )

    try:
        build_tokenizer(args)
    except (OSError, ValueError, ImportError) as err:
        vocab = args.vocab_size or ASSUMED_VOCAB_SIZE
        args.padded_vocab_size = vocab_size_with_padding(vocab, args, logging_enabled=False)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        source = "--vocab-size" if args.vocab_size else "assumed; give --vocab-size"
        notes.append(f"tokenizer not loaded here ({reason[:100]}); vocabulary {vocab} ({source})")


# ---- world size ---------------------------------------------------------------------------------


def smallest_world_size(args) -> int:
    """The fewest GPUs the layout allows: a multiple of TP x CP x PP (the dense grid) and of
    ETP x EP x PP (the expert grid)."""
    pp = args.pipeline_model_parallel_size
    dense = args.tensor_model_parallel_size * args.context_parallel_size * pp
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    expert = etp * args.expert_model_parallel_size * pp
    return math.lcm(dense, expert)


def _parse_unvalidated(argv: list[str]):
    from megatron.training.arguments import parse_args

    from megatron_mhc.training.arguments import add_mhc_arguments

    with _launch_environment(argv, world_size=1), contextlib.redirect_stdout(io.StringIO()):
        return parse_args(add_mhc_arguments)


# ---- the build of every stage on the meta device -------------------------------------------------


def _build_stage_on_meta(args, stage: int):
    """The model chunks rank `stage * N / PP` (TP, CP, EP, DP rank 0 of pipeline stage `stage`)
    would build, on the meta device, as megatron.training.get_model builds them."""
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


@contextlib.contextmanager
def _meta_build_arguments(args) -> Iterator[None]:
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


def _is_mhc_module(module) -> bool:
    from megatron_mhc.transformer.hyper_connection import (
        HyperConnectionHead,
        HyperConnectionModule,
    )

    return isinstance(module, (HyperConnectionModule, HyperConnectionHead))


def _stage_layers(chunk) -> list:
    model = getattr(chunk, "module", chunk)
    stack = getattr(model, "decoder", None)
    return list(stack.layers) if stack is not None else []


def _count_parameters(args, chunks) -> dict:
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
        if _is_mhc_module(m)
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


# ---- memory --------------------------------------------------------------------------------------


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
        layers = _stage_layers(chunk)
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
        hc_modules = [m for m in model.modules() if _is_mhc_module(m)]
        if hc_modules:
            n = args.mhc_num_residual_streams
            per_module = (1 / sp) * unit + (2 * n * n + 4 * n + 1) * 4 * s * b / sp
            stream_states = len(hc_modules) * n
            if recompute and layers:
                stream_states = math.ceil(len(layers) / _block_size(args, chunk)) * n
            total += len(hc_modules) * per_module + stream_states * unit / sp
        if getattr(model, "pre_process", False):
            total += 8 * s * b + masks
        if getattr(model, "post_process", False):
            total += 2 * unit / sp + 4 * s * b * args.padded_vocab_size / tp
    return total


def _block_size(args, chunk) -> int:
    """L_r of the chunk's mHC recompute: the run's, else eq. 20 ('auto') for the chunk's layers
    (what turning the recompute on with 'auto' would give)."""
    from megatron_mhc.transformer.recompute import recompute_block_size

    stack = getattr(getattr(chunk, "module", chunk), "decoder", None)
    block = getattr(stack, "recompute_block_size", None)
    return block or recompute_block_size(
        "auto", args.mhc_num_residual_streams, len(_stage_layers(chunk))
    )


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
    """Bytes per GPU of the most loaded stage. Weights in the run's precision (the fp32 HC
    parameters stay fp32 in a bf16 model), gradients in fp32 when Megatron accumulates them in
    fp32 and for the fp32 parameters always (a gradient buffer has its parameter's dtype);
    Adam's two fp32 moments (SGD: one) plus fp32 main weights in mixed precision; the
    distributed optimizer shards the optimizer state over the data-parallel ranks (expert-data-
    parallel for expert parameters), as compute_weight_and_optimizer_memory does."""
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


# ---- what the real run needs ---------------------------------------------------------------------


def required_extras(args, config) -> list[tuple[str, str, bool]]:
    """(package, why, installed here) for what the real launch imports beyond the base install."""

    needs = []
    te_reasons = [
        reason
        for reason, on in (
            (
                "--transformer-impl transformer_engine",
                args.transformer_impl == "transformer_engine",
            ),
            ("fused RoPE (--no-rope-fusion turns it off)", config.apply_rope_fusion),
            ("fp8", bool(args.fp8)),
        )
        if on
    ]
    if te_reasons:
        needs.append(
            ("transformer-engine", ", ".join(te_reasons), _installed("transformer_engine"))
        )
    if args.transformer_impl == "local" and (
        args.gradient_accumulation_fusion or not args.no_persist_layer_norm
    ):
        needs.append(
            (
                "apex",
                "gradient-accumulation fusion / persistent layer norm with the local spec",
                _installed("apex"),
            )
        )
    if config.mhc_active and args.mhc_kernel_backend in ("auto", "triton"):
        needs.append(("triton", f"mHC kernels ({args.mhc_kernel_backend})", _installed("triton")))
    if config.mhc_active and args.mhc_kernel_backend == "cutile":
        needs.append(("cuda-tile", "mHC kernels (cutile)", _installed("cuda.tile")))
    pattern = args.hybrid_layer_pattern or ""
    if "M" in pattern:
        needs.append(("mamba-ssm", "Mamba layers (M)", _installed("mamba_ssm")))
    if "G" in pattern:
        needs.append(("flash-linear-attention", "GDN layers (G)", _installed("fla")))
    return needs


# ---- the dry run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class DryRunResult:
    args: argparse.Namespace
    stages: list[StageReport]
    memory: MemoryEstimate
    notes: list[str]
    extras: list[tuple[str, str, bool]]
    num_microbatches: int
    megatron_weight_and_optimizer_bytes: float | None


def megatron_weight_and_optimizer_bytes(args) -> float | None:
    """Megatron's theoretical_memory_usage figure for the weights, gradients and optimizer state
    of the most loaded shard (bf16 training assumed, even pipeline split, no mHC parameters);
    None for a HybridModel, which it does not cover."""
    from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory

    if args.hybrid_layer_pattern is not None:
        return None
    # It sets num_query_groups on the namespace it is given.
    return compute_weight_and_optimizer_memory(copy.copy(args))


def dry_run(argv: list[str], world_size: int | None = None) -> DryRunResult:
    """Validate `argv` (pretrain_gpt_mhc.py's flags) as a launch on `world_size` GPUs (default:
    the smallest the layout allows) would, and build and size every stage. Raises what the
    launch's checks raise (ValueError, ConfigError, Megatron's AssertionError) when the launch
    would not start."""
    from megatron_mhc.training.launch_checks import parse_and_check_arguments

    argv = [a for a in argv if a != "--dry-run"]
    argv = _without_world_size(argv)
    if world_size is None:
        world_size = smallest_world_size(_parse_unvalidated(argv))
    notes: list[str] = []
    with _launch_environment(argv, world_size), _as_on_gpu_machine(notes):
        args, config = parse_and_check_arguments(
            check_data=False, set_globals=False, this_machine=False
        )
    _padded_vocabulary(args, notes)
    # Megatron's constant micro-batch calculator (the batch sizes are checked above).
    num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    stages = []
    with _meta_build_arguments(args):
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
    chunks = _build_stage_on_meta(args, stage)
    counts = _count_parameters(args, chunks)
    blocks = [_block_size(args, c) for c in chunks if _stage_layers(c)]
    return StageReport(
        index=stage,
        layers=sum(len(_stage_layers(c)) for c in chunks),
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


def _without_world_size(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--world-size":
            skip = True
        elif not arg.startswith("--world-size="):
            out.append(arg)
    return out


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
        "activation_bytes_per_microbatch (megatron_mhc/training/dry_run.py) times the "
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


def main(argv: list[str]) -> int:
    """`pretrain_gpt_mhc.py --dry-run`: print the summary and return 0, or print the error line
    a launch would print and return its exit code (2)."""
    from megatron_mhc.training.launch_checks import launch_error_line

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--world-size", type=int, default=None)
    world_size = pre.parse_known_args(argv)[0].world_size
    if world_size is not None and world_size < 1:
        print(
            f"pretrain_gpt_mhc.py: error: --world-size {world_size}: must be >= 1", file=sys.stderr
        )
        return 2
    try:
        # Megatron's parser prints every argument; the summary says what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            result = dry_run(argv, world_size)
    except (ValueError, AssertionError) as err:
        print(launch_error_line(err), file=sys.stderr)
        return 2
    print(summary(result))
    return 0
