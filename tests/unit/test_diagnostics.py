"""mHC health figures: Amax gains of hand-made mappings, mHC's doubly stochastic mixing keeps
the gains at 1 and the token-averaged H_res doubly stochastic, and the stack figures of a PP=2
model equal those of the PP=1 model."""

import pytest
import torch

from megatron_mhc.diagnostics import MHCHealthMonitor, amax_gains
from tests.dist_utils import (
    destroy_model_parallel,
    full_state_dict,
    initialize_model_parallel,
    load_full_state_dict,
    run_distributed,
)
from tests.tiny_gpt import batches, build_tiny_gpt, forward_backward, tiny_config


def test_amax_gains_are_max_row_and_column_sums():
    p = torch.tensor([[[1.0, 1.0], [0.0, -3.0]], [[2.0, 0.0], [0.0, 1.0]]])
    # Token 0: rows sum to 2 and -3, columns to 1 and -2; token 1: 2 and 1 both ways.
    assert amax_gains(p) == (pytest.approx((3 + 2) / 2), pytest.approx((2 + 2) / 2))


def _figures_per_layout(rank, world_size, overrides):
    from megatron.core import parallel_state

    results, full = {}, None
    for pp in (1, 2):
        initialize_model_parallel(1, pp)
        model = build_tiny_gpt(tiny_config(pipeline_model_parallel_size=pp, **overrides))
        if full is None:
            full = full_state_dict(model)
        load_full_state_dict(model, full)
        monitor = MHCHealthMonitor([model])
        with monitor.recording():
            forward_backward(model, batches())
        results[pp] = monitor.summarize(parallel_state.get_pipeline_model_parallel_group())
        destroy_model_parallel()
    return results


@pytest.mark.parametrize("mhc_type", ["mhc", "hc"])
def test_stack_figures_span_pipeline_stages(mhc_type):
    overrides = dict(
        enable_mhc_connections=True,
        mhc_num_residual_streams=4,
        mhc_type=mhc_type,
        mhc_init_gating_factor=0.5,
    )
    per_rank = run_distributed(_figures_per_layout, 2, overrides)
    single = per_rank[0][1]
    assert {f"mhc/layer{i:02d}/amax_gain_fwd" for i in range(1, 5)} <= single.keys()
    for rank_figures in per_rank:
        assert rank_figures[2].keys() == single.keys()
        for key, value in single.items():
            assert rank_figures[2][key] == pytest.approx(value, rel=1e-5), key
    if mhc_type == "mhc":
        # Doubly stochastic mixing: every product has unit row and column sums.
        assert single["mhc/amax_gain_fwd"] == pytest.approx(1.0, abs=1e-3)
        assert single["mhc/amax_gain_bwd"] == pytest.approx(1.0, abs=1e-3)
        for prefix in [f"mhc/layer{i:02d}/h_res" for i in range(1, 5)] + ["mhc/h_res"]:
            matrix = torch.tensor(
                [[single[f"{prefix}/{i}_{j}"] for j in range(4)] for i in range(4)]
            )
            assert torch.allclose(matrix.sum(dim=0), torch.ones(4), atol=1e-3), prefix
            assert torch.allclose(matrix.sum(dim=1), torch.ones(4), atol=1e-3), prefix
            assert (matrix >= 0).all(), prefix
        assert 0.0 < single["mhc/h_pre_mean"] < 1.0 + 1e-6
        assert 0.0 < single["mhc/h_post_mean"] < 2.0
    else:
        # hc starts at B_res = I, B_post = 1, B_pre = one-hot: unit gains, mean H_pre 1/n.
        assert single["mhc/amax_gain_fwd"] == pytest.approx(1.0, abs=1e-6)
        assert single["mhc/h_pre_mean"] == pytest.approx(0.25, abs=1e-6)
