"""Tiny GPT models, data and steps shared by the tests (CPU-friendly Megatron settings).

`tiny_config(**overrides)` is an MHCTransformerConfig (or `config_class`: the MLA one) for a
4-layer, 32-wide model on the local (pure PyTorch) spec with Megatron's CUDA-only fusions off;
with `enable_mhc_connections=False` (the default here) it describes the plain Megatron model.
`build_tiny_gpt(config)` builds this pipeline stage's part through `build_mhc_gpt_model`;
`forward_backward` runs Megatron's real schedule (through megatron_mhc's
`get_forward_backward_func`) on `batches()`; `train_on_a_fixed_batch` trains as
megatron.training does. `MHC_4_STREAMS` and `CPU_MOE` are the mHC and MoE settings the tests
share; `randomize_hc_parameters` gives a model non-uniform mappings.
"""

import torch

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.models.gpt import build_mhc_gpt_model
from megatron_mhc.platform.cpu import CPU_CONFIG_FIELDS
from megatron_mhc.transformer.pipeline_shapes import get_forward_backward_func

SEQ, MICRO_BATCH, NUM_MICROBATCHES, VOCAB = 16, 2, 2, 128
# mHC with n = 4 residual streams (default random init, mean output contract).
MHC_4_STREAMS = dict(enable_mhc_connections=True, mhc_num_residual_streams=4)
# Local-spec MoE on CPU: no bias (the local expert MLP would add it in place on a view) and the
# allgather dispatcher (alltoall creates a CUDA stream).
CPU_MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    add_bias_linear=False,
    moe_token_dispatcher_type="allgather",
)
# CPU_MOE as Megatron's combined 1F1B schedule (`overlap_moe_expert_parallel_comm`) requires it,
# besides expert parallelism: the alltoall (or flex) dispatcher, bf16 or fp16.
COMBINED_1F1B_MOE = dict(
    CPU_MOE, moe_token_dispatcher_type="alltoall", bf16=True, pipeline_dtype=torch.bfloat16
)
# Weights and stage-to-stage tensors in float64 (with torch.set_default_dtype(torch.float64) for
# Megatron's local norms): layouts compared in it differ by the partitioning of the math only.
FLOAT64 = dict(params_dtype=torch.float64, pipeline_dtype=torch.float64)


def tiny_config(config_class: type = MHCTransformerConfig, **overrides) -> MHCTransformerConfig:
    fields = dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG_FIELDS,
    )
    fields.update(overrides)
    return config_class(**fields)


def build_tiny_gpt(config: MHCTransformerConfig, **gpt_kwargs):
    from megatron.core import parallel_state

    gpt_kwargs.setdefault("position_embedding_type", "rope")
    return build_mhc_gpt_model(
        config,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        **gpt_kwargs,
    )


def batches(seed: int = 0, num: int = NUM_MICROBATCHES):
    """`num` micro-batches of (tokens, labels), [MICRO_BATCH, SEQ] each."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (num, MICRO_BATCH, SEQ + 1), generator=generator)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def causal_mask() -> torch.Tensor:
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits [b, s, vocab] for `tokens` (a single-stage model)."""
    position_ids = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    return model(tokens, position_ids, causal_mask())


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    losses = model(tokens, position_ids, causal_mask(), labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach()}

    return losses, loss_func


def run_schedule(model, data, forward_step_func=forward_step, forward_only: bool = False):
    """Megatron's schedule over the micro-batches `data` for `model`, or for a list of this
    rank's model chunks (one per virtual pipeline stage): the loss function's outputs, one per
    micro-batch, on the last stage."""
    chunks = model if isinstance(model, list) else [model]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=[iter(data) for _ in chunks],
        model=chunks,
        num_microbatches=len(data),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )


def forward_backward(model, data, forward_only: bool = False):
    """Megatron's schedule over `data` (`model`: a model or a list of model chunks, as for
    run_schedule); the mean loss on the last stage, None elsewhere."""
    from megatron.core import parallel_state

    losses = run_schedule(model, data, forward_only=forward_only)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.stack([x["loss"] for x in losses]).mean().item()


def megatron_training(model, config, bf16: bool = False, distributed_optimizer: bool = False):
    """`model` set up as megatron.training trains it: gradients finalised by Megatron's
    `finalize_model_grads`, bf16 weights (Float16Module) with `bf16`, DistributedDataParallel,
    and Megatron's Adam (lr 3e-3, clip 1; sharded over data-parallel ranks with
    `distributed_optimizer`) -> (wrapped model, optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config.finalize_model_grads_func = finalize_model_grads
    if bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.0,
            clip_grad=1.0,
            bf16=bf16,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [model],
    )
    return model, optimizer


def train_step(model, optimizer, forward_backward_step):
    """One optimizer step: gradients zeroed, `forward_backward_step(model)` (its result is
    returned), then the update, which must succeed."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward_step(model)
    update_successful, _, _ = optimizer.step()
    assert update_successful
    return result


def train_on_a_fixed_batch(model, steps: int, forward_backward_step=forward_backward) -> list:
    """`steps` optimizer steps of `model` set up by megatron_training, each on the same
    micro-batches (batches(seed=3)): what `forward_backward_step(model, data)` returned at each
    step (by default the mean loss)."""
    model, optimizer = megatron_training(model, model.config)
    data = batches(seed=3)
    return [
        train_step(model, optimizer, lambda m: forward_backward_step(m, data)) for _ in range(steps)
    ]


def bf16_training_losses_and_grads(gpt, data, steps: int, forward_step_func=forward_step):
    """`steps` optimizer steps of `gpt` set up as megatron.training's get_model does for bf16
    (Float16Module weights, DDP with fp32 gradients), each over the micro-batches `data`: per
    step, the loss of each micro-batch and this rank's gradients (dist_utils.export_grads)."""
    from tests.dist_utils import export_grads

    model, optimizer = megatron_training(gpt, gpt.config, bf16=True)
    losses, grads = [], []
    for _ in range(steps):
        outputs = train_step(model, optimizer, lambda m: run_schedule(m, data, forward_step_func))
        losses.append([output["loss"].item() for output in outputs])
        grads.append(export_grads(model))
    return losses, grads


def randomize_hc_parameters(model, seed: int, base_std: float, gating: float) -> None:
    """Random, non-uniform mappings in every HC module and learned head of `model`: base ~
    N(0, base_std^2) (a fixed draw of `seed`), every gating factor `gating`, fn as initialised.
    From the default init (base 0, gating 0.01) H_res is uniform and every stream equal, which
    hides transposes, stream mix-ups and shared heads."""
    from megatron_mhc.transformer.hyper_connection import (
        HyperConnectionHead,
        HyperConnectionModule,
    )

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (HyperConnectionModule, HyperConnectionHead)):
                base = torch.randn(module.base.shape, generator=generator, dtype=torch.float32)
                module.base.copy_(base_std * base)
                module.scale.fill_(gating)


def count_moe_layers(model) -> int:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return sum(isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers)
