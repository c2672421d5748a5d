"""The n-stream state crosses pipeline stages in the shapes of Megatron's own schedules: the
interleaved schedule (PP=2 x VPP=2, including the wrap-around from the last stage to the next
virtual chunk of the first) gives the loss and gradients of PP=1 and of non-interleaved PP=2,
with and without `variable_seq_lengths`."""

import pytest
import torch

from megatron_mhc.models.gpt import build_mhc_gpt_model
from tests import dist_utils
from tests.tiny_gpt import (
    FLOAT64,
    MHC_4_STREAMS,
    SEQ,
    VOCAB,
    batches,
    forward_backward,
    tiny_config,
)

# (PP, VPP, variable_seq_lengths)
LAYOUTS = [(1, None, False), (2, None, False), (2, 2, False), (2, 2, True)]
NUM_MICROBATCHES = 4  # the interleaved schedule needs a multiple of PP


def _chunks(config):
    """This rank's model chunks (one per virtual stage)."""
    from megatron.core import parallel_state

    vp_stages = (
        [None]
        if config.virtual_pipeline_model_parallel_size is None
        else range(config.virtual_pipeline_model_parallel_size)
    )
    return [
        build_mhc_gpt_model(
            config,
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            vp_stage=vp_stage,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            position_embedding_type="rope",
        )
        for vp_stage in vp_stages
    ]


def _step_per_layout(rank, world_size):
    """Same weights in every layout (float64, see test_parallel_equivalence.py); one forward and
    backward of four micro-batches through Megatron's schedule for the layout."""
    torch.set_default_dtype(torch.float64)
    results, full = {}, None
    for pp, vpp, variable_seq_lengths in LAYOUTS:
        dist_utils.initialize_model_parallel(1, pp, virtual_pipeline_model_parallel_size=vpp)
        config = tiny_config(
            **MHC_4_STREAMS,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            variable_seq_lengths=variable_seq_lengths,
            **FLOAT64,
            # Megatron-Core's default batched P2P lets the two sends of PP=2 to the same peer
            # swap under the interleaved schedule; megatron.training sets these for it.
            overlap_p2p_comm=vpp is not None,
            batch_p2p_comm=vpp is None,
            # Megatron refuses variable_seq_lengths with the (default) allgather dispatcher,
            # even for a dense model.
            moe_token_dispatcher_type="alltoall",
        )
        chunks = _chunks(config)
        for chunk in chunks:
            full = dist_utils.same_weights(chunk, full)
        loss = forward_backward(chunks, batches(num=NUM_MICROBATCHES))
        grads = {}
        for chunk in chunks:
            grads.update(dist_utils.export_grads(chunk))
        results[(pp, vpp, variable_seq_lengths)] = (loss, grads)
        dist_utils.destroy_model_parallel()
    return results


def test_interleaved_pipeline_matches_pp1_and_1f1b():
    per_rank = dist_utils.run_distributed(_step_per_layout, 2)
    reference_loss = per_rank[0][LAYOUTS[0]][0]
    reference_grads = dist_utils.merge_full_grads([r[LAYOUTS[0]][1] for r in per_rank])
    assert any("hyper_connection" in name for name in reference_grads)
    for layout in LAYOUTS[1:]:
        losses = [r[layout][0] for r in per_rank if r[layout][0] is not None]
        assert losses, layout
        for loss in losses:
            assert loss == pytest.approx(reference_loss, rel=1e-12), layout
        grads = dist_utils.merge_full_grads([r[layout][1] for r in per_rank])
        assert grads.keys() == reference_grads.keys(), layout
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad,
                reference_grads[name],
                rtol=1e-10,
                atol=1e-14,
                msg=lambda m: f"{layout} {name}: {m}",
            )
