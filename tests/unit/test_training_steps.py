"""mHC with a MoE MLP (also with TP=2 and sequence parallelism), and the `hc` / `hc_static` types,
train with Megatron's DDP, optimizer and schedule: a few steps on a fixed batch give finite,
decreasing loss."""

import math

import pytest

from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.tiny_gpt import (
    batches,
    build_tiny_gpt,
    forward_backward,
    megatron_training,
    tiny_config,
    train_step,
)

STEPS = 6
MHC = dict(enable_mhc_connections=True, mhc_num_residual_streams=4)
VARIANTS = {
    # Local-spec MoE on CPU: no bias (the local expert MLP would add it in place on a view) and
    # the allgather dispatcher (alltoall creates a CUDA stream).
    "mhc_moe_4_experts_top2": dict(
        MHC,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
    ),
    # Megatron requires sequence parallelism for MoE with TP > 1.
    "mhc_moe_tp2_sequence_parallel": dict(
        MHC,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
        tensor_model_parallel_size=2,
        sequence_parallel=True,
    ),
    "hc": dict(MHC, mhc_type="hc"),
    "hc_static": dict(MHC, mhc_type="hc_static"),
}


def _train(rank, world_size, overrides):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    initialize_model_parallel(tp=world_size)
    config = tiny_config(**overrides)
    model = build_tiny_gpt(config)
    moe_layers = sum(isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers)
    model, optimizer = megatron_training(model, config)
    data = batches(seed=3)
    losses = [
        train_step(model, optimizer, lambda m: forward_backward(m, data)) for _ in range(STEPS)
    ]
    return losses, moe_layers


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_with_finite_decreasing_loss(variant):
    tp = VARIANTS[variant].get("tensor_model_parallel_size", 1)
    losses, moe_layers = run_distributed(_train, tp, VARIANTS[variant])[0]
    assert moe_layers == (4 if "moe" in variant else 0)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
