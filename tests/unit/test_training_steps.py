"""mHC with a MoE MLP (also with TP=2 and sequence parallelism), and the `hc` / `hc_static` types,
train with Megatron's DDP, optimizer and schedule: a few steps on a fixed batch give finite,
decreasing loss."""

import math

import pytest

from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.tiny_gpt import (
    CPU_MOE,
    MHC_4_STREAMS,
    build_tiny_gpt,
    count_moe_layers,
    tiny_config,
    train_on_a_fixed_batch,
)

STEPS = 6
VARIANTS = {
    "mhc_moe_4_experts_top2": dict(MHC_4_STREAMS, **CPU_MOE),
    # Megatron requires sequence parallelism for MoE with TP > 1.
    "mhc_moe_tp2_sequence_parallel": dict(
        MHC_4_STREAMS, **CPU_MOE, tensor_model_parallel_size=2, sequence_parallel=True
    ),
    "hc": dict(MHC_4_STREAMS, mhc_type="hc"),
    "hc_static": dict(MHC_4_STREAMS, mhc_type="hc_static"),
}


def _train(rank, world_size, overrides):
    initialize_model_parallel(tp=world_size)
    model = build_tiny_gpt(tiny_config(**overrides))
    moe_layers = count_moe_layers(model)
    return train_on_a_fixed_batch(model, STEPS), moe_layers


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_with_finite_decreasing_loss(variant):
    tp = VARIANTS[variant].get("tensor_model_parallel_size", 1)
    losses, moe_layers = run_distributed(_train, tp, VARIANTS[variant])[0]
    assert moe_layers == (4 if "moe" in variant else 0)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
