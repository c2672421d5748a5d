"""MHCRecomputeManager: training with the n-stream states of each L_r-layer block recomputed is
bitwise the training without (fp32, dropout on, n = 4, 8 layers), also under TP=2 and PP=2, with
MoE layers and Megatron's selective recompute; it really frees memory; eval and forward-only
passes keep everything; bad settings are rejected."""

import pytest
import torch

from megatron_mhc.activation_memory import SavedActivations
from megatron_mhc.transformer.recompute import recompute_block_size
from tests.dist_utils import (
    export_grads,
    initialize_model_parallel,
    run_distributed,
)
from tests.tiny_gpt import (
    CPU_MOE,
    MHC_4_STREAMS,
    batches,
    build_tiny_gpt,
    forward_backward,
    logits,
    tiny_config,
)

MHC_8_LAYERS_DROPOUT = dict(MHC_4_STREAMS, num_layers=8, hidden_dropout=0.1, attention_dropout=0.1)


def _reseed(seed=5):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _with_and_without(rank, world_size, tp, pp, settings, overrides):
    """Loss and gradients of one step for recompute off and for each L_r in `settings`."""
    initialize_model_parallel(tp, pp)
    results, weights = {}, None
    for setting in [None, *settings]:
        model = build_tiny_gpt(
            tiny_config(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                mhc_recompute_layer_num=setting,
                **MHC_8_LAYERS_DROPOUT,
                **overrides,
            )
        )
        if weights is None:
            weights = model.state_dict()
        model.load_state_dict(weights)
        _reseed()
        loss = forward_backward(model, batches())
        block = model.decoder.recompute_block_size
        results[setting] = (loss, export_grads(model), block)
    return results


def _assert_bitwise(per_rank, settings):
    for ranks in per_rank:
        loss, grads, block = ranks[None]
        assert block is None
        for setting in settings:
            got_loss, got_grads, got_block = ranks[setting]
            assert got_block is not None
            assert got_loss == loss, setting
            assert got_grads.keys() == grads.keys()
            for key, (grad, _) in grads.items():
                assert torch.equal(got_grads[key][0], grad), (setting, key)


def test_bitwise_equal_for_every_block_size():
    settings = [1, 2, 3, "auto"]
    per_rank = run_distributed(_with_and_without, 1, 1, 1, settings, {})
    _assert_bitwise(per_rank, settings)
    assert per_rank[0]["auto"][2] == 2  # eq. 20: floor(sqrt(4 * 8 / 6))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_bitwise_equal_under_tensor_and_pipeline_parallelism(tp, pp):
    settings = [3, "auto"]
    per_rank = run_distributed(_with_and_without, tp * pp, tp, pp, settings, {})
    _assert_bitwise(per_rank, settings)
    if pp == 2:  # 4 layers per stage: blocks of floor(sqrt(4 * 4 / 6)) = 1 layer
        assert per_rank[0]["auto"][2] == 1


# Megatron's selective "core_attn" recompute (and MoE). "layernorm" is left out: Megatron-Core
# 0.19.2's CheckpointWithoutOutput sets `fp8 = fp8 is not None` (always True) and then needs
# Transformer Engine; "mlp" recompute does not finish on CPU for the plain Megatron layer either.
def test_bitwise_equal_with_moe_and_selective_recompute():
    overrides = dict(CPU_MOE, recompute_granularity="selective", recompute_modules=["core_attn"])
    per_rank = run_distributed(_with_and_without, 1, 1, 1, [2], overrides)
    _assert_bitwise(per_rank, [2])


def _saved_bytes(rank, world_size, settings):
    initialize_model_parallel()
    out = {}
    for setting in settings:
        model = build_tiny_gpt(tiny_config(mhc_recompute_layer_num=setting, **MHC_8_LAYERS_DROPOUT))
        tokens = batches()[0][0]
        for mode in ("train", "eval"):
            model.train(mode == "train")
            with SavedActivations(model.parameters()) as saved:
                output = logits(model, tokens)
            out[(setting, mode)] = saved.nbytes
            output.float().sum().backward()  # restores what was freed; must not fail
        model.train()
        with torch.no_grad():
            forward_only = logits(model, tokens)
        out[(setting, "no_grad_finite")] = bool(torch.isfinite(forward_only).all())
    return out


def test_recompute_frees_stream_states_only_in_training():
    out = run_distributed(_saved_bytes, 1, [None, 1, "auto"])[0]
    # 8 layers x 2 HC modules keep one [s, b, 4 * 32] fp32 state each without recompute; with
    # blocks of L_r layers only the 8 / L_r block inputs stay.
    state_bytes = 16 * 2 * 4 * 32 * 4
    assert out[(None, "train")] - out[(1, "train")] == (16 - 8) * state_bytes
    assert out[(None, "train")] - out[("auto", "train")] == (16 - 4) * state_bytes
    assert out[(1, "eval")] == out[(None, "eval")] == out[("auto", "eval")]
    assert all(out[(s, "no_grad_finite")] for s in (None, 1, "auto"))


def _recompute_plans(rank, world_size, settings):
    """Per setting: the recompute plan of each HC module of the decoder, in forward order."""
    initialize_model_parallel()
    out = {}
    for setting in settings:
        config = tiny_config(mhc_recompute_layer_num=setting, **MHC_8_LAYERS_DROPOUT)
        decoder = build_tiny_gpt(config).decoder
        hcs = [hc for layer in decoder.layers for hc in layer.hyper_connections]
        plans = [hc.recompute_plan for hc in hcs]
        given_twice = None
        if plans[0] is not None:
            try:
                hcs[0].set_recompute_plan(plans[0])
            except RuntimeError as err:
                given_twice = str(err)
        out[setting] = dict(
            managers=[
                plan is not None and plan.manager is decoder.recompute_manager for plan in plans
            ],
            closes=[plan is not None and plan.closes_block for plan in plans],
            no_plan=[plan is None for plan in plans],
            given_twice=given_twice,
        )
    return out


def test_each_hc_module_gets_its_block_plan_at_construction():
    planned = run_distributed(_recompute_plans, 1, [3, None])[0]
    assert all(planned[3]["managers"])
    # 8 layers of 2 HC modules (attention, MLP) in blocks of 3 layers: the MLP update of layers
    # 3, 6 and 8 (the stage's last) closes a block.
    closing = [index for index, closes in enumerate(planned[3]["closes"]) if closes]
    assert closing == [2 * layer - 1 for layer in (3, 6, 8)]
    assert "only once" in planned[3]["given_twice"]
    assert all(planned[None]["no_plan"])


def test_block_size_follows_eq20_per_stage():
    assert recompute_block_size("auto", 4, 12) == 2
    assert recompute_block_size("auto", 4, 30) == 4
    assert recompute_block_size("auto", 4, 1) == 1
    assert recompute_block_size(3, 4, 12) == 3
    assert recompute_block_size(None, 4, 12) is None


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(mhc_recompute_layer_num=0), "mhc_recompute_layer_num"),
        (dict(mhc_recompute_layer_num="sqrt"), "mhc_recompute_layer_num"),
        (
            dict(
                mhc_recompute_layer_num=2,
                recompute_granularity="full",
                recompute_method="uniform",
                recompute_num_layers=1,
            ),
            "mhc_recompute_layer_num",
        ),
    ],
)
def test_bad_recompute_settings_are_rejected(overrides, field):
    with pytest.raises(ValueError, match=rf"\.{field}="):
        tiny_config(enable_mhc_connections=True, **overrides)
