"""Sequence parallelism on the local spec (its torch norms are SequenceParallelTorchNorms), through
Megatron's DistributedDataParallel, schedule and finalize_model_grads on gloo processes: TP=2 +
SP (also with PP=2) gives the loss and (gathered) gradients of TP=1, with mHC (mean or learned
contract, with the mHC recompute) and without (also with an MTP layer); the gradients of the HC
parameters and norms, partial sums over each rank's sequence shard after backward, are summed
over the tensor-parallel ranks by finalize_model_grads."""

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

# (TP, PP); sequence parallel wherever TP > 1; the remaining ranks are data-parallel replicas.
TP1, TP2, TP2_PP2 = (1, 1), (2, 1), (2, 2)
MODELS = {
    "baseline": dict(enable_mhc_connections=False),
    "mhc": MHC_4_STREAMS,
    "mhc_learned_contract": dict(MHC_4_STREAMS, mhc_output_contract="learned"),
    "mhc_recompute": dict(MHC_4_STREAMS, mhc_recompute_layer_num=2),
    "baseline_mtp": dict(enable_mhc_connections=False, mtp_num_layers=1),
}


def _is_replicated_sequence_parallel(name: str) -> bool:
    """HC parameters and norms: whole on every TP rank, fed each rank's sequence shard."""
    return "_hyper_connection." in name or "mhc_head" in name or "layernorm" in name


def _step_per_model_and_layout(rank, world_size, models, layouts):
    """Same weights in every layout; one forward+backward of two micro-batches each, in float64
    (see test_parallel_equivalence.py). Also returns the gradients as finalize_model_grads found
    them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    torch.set_default_dtype(torch.float64)
    results = {}
    for model_name in models:
        full = None
        for tp, pp in layouts:
            dist_utils.initialize_model_parallel(tp, pp)
            config = tiny_config(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                sequence_parallel=tp > 1,
                **FLOAT64,
                **MODELS[model_name],
            )
            before_finalize = {}

            def record_then_finalize(model_chunks, *args, **kwargs):
                before_finalize.update(dist_utils.export_grads(model_chunks[0].module))
                finalize_model_grads(model_chunks, *args, **kwargs)

            config.finalize_model_grads_func = record_then_finalize
            model = build_tiny_gpt(config)
            full = dist_utils.same_weights(model, full)
            model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
            loss = forward_backward(model, batches())
            results[(model_name, tp, pp)] = (
                loss,
                dist_utils.export_grads(model.module),
                before_finalize,
            )
            dist_utils.destroy_model_parallel()
    return results


def _assert_layout_matches_tp1(per_rank, model, layout):
    reference_loss = per_rank[0][(model, *TP1)][0]
    reference_grads = dist_utils.merge_full_grads([r[(model, *TP1)][1] for r in per_rank])
    losses = [r[(model, *layout)][0] for r in per_rank if r[(model, *layout)][0] is not None]
    assert losses
    for loss in losses:
        assert abs(loss - reference_loss) <= 1e-5 * abs(reference_loss), loss
    grads = dist_utils.merge_full_grads([r[(model, *layout)][1] for r in per_rank])
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        want = reference_grads[name]
        # Relative to the tensor's scale: TP sums partial products in another order.
        assert_close_to_scale(grad, want, 1e-5, name)


@pytest.fixture(scope="module")
def per_rank():
    return dist_utils.run_distributed(_step_per_model_and_layout, 2, list(MODELS), [TP1, TP2])


@pytest.mark.parametrize("model", MODELS)
def test_tp2_sequence_parallel_matches_tp1(per_rank, model):
    _assert_layout_matches_tp1(per_rank, model, TP2)


def test_tp2_pp2_sequence_parallel_matches_tp1():
    """The pipeline stages exchange the sequence shard of the n-stream state."""
    per_rank = dist_utils.run_distributed(_step_per_model_and_layout, 4, ["mhc"], [TP1, TP2_PP2])
    _assert_layout_matches_tp1(per_rank, "mhc", TP2_PP2)


@pytest.mark.parametrize("model", ["mhc", "mhc_learned_contract"])
def test_hc_and_norm_grads_are_summed_over_tp_ranks_by_finalize_model_grads(per_rank, model):
    (_, after_0, before_0), (_, after_1, before_1) = (r[(model, *TP2)] for r in per_rank)
    names = [key[0] for key in after_0 if _is_replicated_sequence_parallel(key[0])]
    assert sum("_hyper_connection." in n for n in names) >= 4 * 2 * 3  # 4 layers, 2 HCs, 3 params
    assert sum("layernorm" in n for n in names) == (4 * 2 + 1) * 2  # LayerNorm weight, bias
    for name in names:
        grad_0, grad_1 = after_0[(name, 0, 0)][0], after_1[(name, 1, 0)][0]
        partial_0, partial_1 = before_0[(name, 0, 0)][0], before_1[(name, 1, 0)][0]
        # Each rank saw its own half of the sequence: without the all-reduce the ranks disagree.
        assert not torch.allclose(partial_0, partial_1), name
        assert torch.equal(grad_0, grad_1), name
        torch.testing.assert_close(
            grad_0, partial_0 + partial_1, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}"
        )
