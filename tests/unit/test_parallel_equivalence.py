"""An mHC GPT (n = 4, default random init) through Megatron's real forward-backward schedule on
gloo processes: TP=2, PP=2 and TP2xPP2 give the loss and (gathered) gradients of TP=1/PP=1; so
does Megatron's plain GPTModel (mHC off), which checks the CPU platform under the schedules."""

import pytest
import torch

from tests import dist_utils
from tests.numerics import assert_close_to_scale
from tests.tiny_gpt import (
    FLOAT64,
    MHC_4_STREAMS,
    batches,
    build_tiny_gpt,
    forward_backward,
    tiny_config,
)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP); the rest of the 4 ranks is DP
MODELS = {
    "baseline": dict(enable_mhc_connections=False),
    "mhc": MHC_4_STREAMS,
    "mhc_learned_contract": dict(MHC_4_STREAMS, mhc_output_contract="learned"),
}


def _step_per_layout(rank, world_size, overrides):
    """Same weights in every layout; one forward+backward of two micro-batches each.

    The model runs in float64 (Megatron's local norms take the default dtype; its vocab-parallel
    cross entropy stays fp32): what is compared is the partitioning of the math. In fp32 the
    gradients of the res biases, differences of nearly equal terms near the uniform initial
    Sinkhorn point, carry rounding noise of ~2e-5 relative to their own (small) scale.
    """
    torch.set_default_dtype(torch.float64)
    results, full = {}, None
    for tp, pp in LAYOUTS:
        dist_utils.initialize_model_parallel(tp, pp)
        model = build_tiny_gpt(
            tiny_config(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                **FLOAT64,
                **overrides,
            )
        )
        full = dist_utils.same_weights(model, full)
        loss = forward_backward(model, batches())
        results[(tp, pp)] = (loss, dist_utils.export_grads(model))
        dist_utils.destroy_model_parallel()
    return results


@pytest.mark.parametrize("model", MODELS)
def test_tp_pp_layouts_match_tp1pp1(model):
    per_rank = dist_utils.run_distributed(_step_per_layout, 4, MODELS[model])
    reference_loss = per_rank[0][(1, 1)][0]
    reference_grads = dist_utils.merge_full_grads([r[(1, 1)][1] for r in per_rank])
    hc_grads = [
        name for name in reference_grads if "_hyper_connection." in name or "mhc_head" in name
    ]
    if model != "baseline":
        assert len(hc_grads) >= 4 * 2 * 3, "every HC parameter must receive a gradient"
    for layout in LAYOUTS[1:]:
        losses = [r[layout][0] for r in per_rank if r[layout][0] is not None]
        assert losses, layout
        for loss in losses:
            assert abs(loss - reference_loss) <= 1e-5 * abs(reference_loss), (layout, loss)
        grads = dist_utils.merge_full_grads([r[layout][1] for r in per_rank])
        assert grads.keys() == reference_grads.keys(), layout
        for name, grad in grads.items():
            want = reference_grads[name]
            assert torch.isfinite(grad).all(), name
            # Relative to the tensor's scale: TP sums partial products in another order.
            assert_close_to_scale(grad, want, 1e-5, f"{layout} {name}")
