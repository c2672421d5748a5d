"""Megatron's combined 1F1B schedule (`overlap_moe_expert_parallel_comm`: the expert-parallel
all-to-alls of one micro-batch overlap the computation of another) and the alltoall token
dispatcher run on CPU with megatron_mhc.platform.cpu: a plain MoE GPT (no mHC) trained with
Megatron's DDP, optimizer and schedules has bit-equal losses and gradients with and without the
overlap (also with `delay_wgrad_compute`: the schedule's delayed weight-gradient steps run, empty
for the local spec's linears), and its loss decreases."""

import math

import torch

from tests.dist_utils import initialize_model_parallel, run_distributed, same_weights
from tests.tiny_gpt import (
    COMBINED_1F1B_MOE,
    batches,
    bf16_training_losses_and_grads,
    build_tiny_gpt,
    forward_step,
    tiny_config,
)

EXPERT_PARALLEL = 2
STEPS = 3
MICROBATCHES = 4  # the combined schedule pairs micro-batch i's forward with i-1's backward
# What Megatron requires of the overlap (COMBINED_1F1B_MOE), with expert parallelism. Layers 0
# and 2 are dense: the schedule builds a dense layer's nodes without dispatch and combine. The
# last layer is MoE: megatron-core 0.19.2 applies the decoder's final norm in the MoE combine node
# only, so under the overlap a model whose last layer is dense runs without it (its losses differ
# from the plain schedule's).
PLAIN_MOE_GPT = dict(
    COMBINED_1F1B_MOE, moe_layer_freq=[0, 1, 0, 1], expert_model_parallel_size=EXPERT_PARALLEL
)

# Schedule settings tried in a row, in one set of processes; the first is the plain schedule.
SCHEDULES = {
    "plain": dict(),
    "overlap": dict(overlap_moe_expert_parallel_comm=True),
    "overlap_delay_wgrad": dict(overlap_moe_expert_parallel_comm=True, delay_wgrad_compute=True),
}

_schedule_plans_built = 0


def _forward_step(data_iterator, model, return_schedule_plan=False):
    # The combined 1F1B schedule asks for the model's schedule plan, built from the same inputs,
    # in place of its output; the loss function is the same.
    global _schedule_plans_built
    if not return_schedule_plan:
        return forward_step(data_iterator, model)
    _schedule_plans_built += 1
    return forward_step(data_iterator, model.build_schedule_plan)


def _train_under_each_schedule(rank, world_size):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    initialize_model_parallel(expert_model_parallel_size=world_size)
    data = batches(seed=rank, num=MICROBATCHES)
    weights = None
    runs = {}
    for schedule, settings in SCHEDULES.items():
        config = tiny_config(**PLAIN_MOE_GPT, **settings)
        gpt = build_tiny_gpt(config)
        weights = same_weights(gpt, weights)
        alltoall_layers = sum(
            isinstance(getattr(layer.mlp, "token_dispatcher", None), MoEAlltoAllTokenDispatcher)
            for layer in gpt.decoder.layers
        )
        plans_before = _schedule_plans_built
        losses, grads = bf16_training_losses_and_grads(gpt, data, STEPS, _forward_step)
        runs[schedule] = dict(
            losses=losses,
            grads=grads,
            alltoall_layers=alltoall_layers,
            schedule_plans=_schedule_plans_built - plans_before,
        )
    return runs


def test_combined_1f1b_overlap_equals_plain_schedule_bitwise_for_plain_moe_gpt_on_cpu():
    for rank, runs in enumerate(run_distributed(_train_under_each_schedule, EXPERT_PARALLEL)):
        plain = runs["plain"]
        assert plain["alltoall_layers"] == 2
        assert plain["schedule_plans"] == 0
        for schedule in ("overlap", "overlap_delay_wgrad"):
            overlapped = runs[schedule]
            assert overlapped["alltoall_layers"] == 2
            # Megatron's combined schedule ran (it builds one schedule plan per micro-batch).
            assert overlapped["schedule_plans"] == STEPS * MICROBATCHES, schedule
            assert overlapped["losses"] == plain["losses"], (rank, schedule)
            for step, (plain_grads, overlapped_grads) in enumerate(
                zip(plain["grads"], overlapped["grads"], strict=True)
            ):
                assert plain_grads.keys() == overlapped_grads.keys()
                for key, (grad, _) in plain_grads.items():
                    assert torch.equal(overlapped_grads[key][0], grad), (rank, schedule, step, key)
        # The alltoall dispatcher trains: finite loss, decreasing over the steps.
        step_losses = [sum(losses) / MICROBATCHES for losses in plain["losses"]]
        assert all(math.isfinite(loss) for loss in step_losses), step_losses
        assert step_losses[-1] < step_losses[0], step_losses
