"""mHC layers under Megatron's combined 1F1B schedule (`overlap_moe_expert_parallel_comm`), on CPU.

A MoE mHC GPT (EP=2 on 2 gloo processes, bf16, dense and MoE layers, the last one dense, or MoE)
trained with Megatron's DDP, optimizer and real schedules has bit-equal losses and gradients with
and without the overlap, also with the mHC recompute manager, with `delay_wgrad_compute` and
with one MTP layer (dense or MoE inner layer; the MTP losses bit-equal too); the MLP's HC update
runs as its own schedule node right after its layer's combine (or dense MLP) and before the next
layer's pre-dispatch node, first in its layer's backward, and the streams are contracted before
the final norm once per micro-batch. An mHC HybridModel (attention, MLP and MoE layers, the last
one MoE; its schedule plan is MHCHybridModel's, megatron-core 0.19.2 has none) is bitwise the
plain schedule under the overlap too, also with the recompute manager and with an MTP depth of
an attention and a MoE layer; a hybrid overlap it cannot run (delay_wgrad_compute, mHC off) is
refused before it is built. Under an interleaved pipeline (EP=2 x PP=2 x VPP=2 on 4 processes)
the overlap's losses and gradients equal those of Megatron's plain interleaved schedule bit for
bit, also with the recompute manager, for the GPT and for a HybridModel of 4 pattern stages.
"""

import pytest
import torch

from tests.dist_utils import initialize_model_parallel, run_distributed, same_weights
from tests.tiny_gpt import (
    COMBINED_1F1B_MOE,
    SEQ,
    batches,
    bf16_training_losses_and_grads,
    build_tiny_gpt,
    count_moe_layers,
    forward_step,
    run_schedule,
    tiny_config,
)
from tests.tiny_hybrid import build_tiny_hybrid, tiny_hybrid_config

EXPERT_PARALLEL = 2
STEPS = 2
MICROBATCHES = 4  # the combined schedule pairs micro-batch i's forward with i-1's backward
MOE_LAYER_FREQ = [0, 1, 1, 0]
# Megatron's requirements of the overlap (COMBINED_1F1B_MOE) as in test_cpu_overlap_schedule.py;
# a shared expert (computed in the pre-dispatch node, added in the combine node); dropout on, so
# that the random numbers drawn by forward must come in the same order in both schedules.
MHC_MOE_GPT = dict(
    COMBINED_1F1B_MOE,
    enable_mhc_connections=True,
    hidden_dropout=0.1,
    moe_layer_freq=MOE_LAYER_FREQ,
    moe_shared_expert_intermediate_size=32,
    expert_model_parallel_size=EXPERT_PARALLEL,
)
OVERLAP = dict(overlap_moe_expert_parallel_comm=True)
# A MoE last layer: its combine node must leave the final norm, and with it the contract, to
# the layer's update node (Megatron's combine node applies the final norm of a last layer).
MOE_LAST_LAYER = dict(moe_layer_freq=[0, 1, 1, 1])
MTP = dict(mtp_num_layers=1)
HYBRID = dict(hybrid_layer_pattern="*-*E*E")
HYBRID_MTP = dict(hybrid_layer_pattern="*-*E*E/*E", mtp_num_layers=1)
# Schedule settings tried in a row, in one set of processes, each compared with its plain
# schedule (BASELINES), the same weights and dropout masks in both.
SCHEDULES = {
    "plain": dict(),
    "overlap": OVERLAP,
    "overlap_mhc_recompute": dict(**OVERLAP, mhc_recompute_layer_num=2),
    "overlap_delay_wgrad": dict(**OVERLAP, delay_wgrad_compute=True),
    # The update node on the high-priority stream (the CPU platform's stand-in streams).
    "overlap_high_priority_stream": dict(**OVERLAP, mhc_mlp_high_priority_stream=True),
    "plain_moe_last_layer": MOE_LAST_LAYER,
    "overlap_moe_last_layer": dict(**OVERLAP, **MOE_LAST_LAYER),
    # One MTP depth, whose inner layer is of the decoder's last layer's kind: dense, then MoE.
    "plain_mtp": MTP,
    "overlap_mtp": dict(**OVERLAP, **MTP),
    "plain_moe_last_layer_mtp": dict(**MOE_LAST_LAYER, **MTP),
    "overlap_moe_last_layer_mtp": dict(**OVERLAP, **MOE_LAST_LAYER, **MTP),
    # HybridModel: attention, MLP and MoE layers, one sublayer each, the last one MoE.
    "plain_hybrid": HYBRID,
    "overlap_hybrid": dict(**OVERLAP, **HYBRID),
    "overlap_hybrid_mhc_recompute": dict(**OVERLAP, **HYBRID, mhc_recompute_layer_num=2),
    # A hybrid MTP depth of an attention and a MoE layer: two layer plans.
    "plain_hybrid_mtp": HYBRID_MTP,
    "overlap_hybrid_mtp": dict(**OVERLAP, **HYBRID_MTP),
}


def _baseline(schedule: str) -> str:
    """The plain schedule of the same model as `schedule`."""
    if "hybrid" in schedule:
        return "plain_hybrid" + ("_mtp" if schedule.endswith("_mtp") else "")
    return (
        "plain"
        + ("_moe_last_layer" if "moe_last_layer" in schedule else "")
        + ("_mtp" if schedule.endswith("_mtp") else "")
    )


def _build(settings):
    """The tiny MoE mHC GPT, or with `hybrid_layer_pattern` the HybridModel of that pattern,
    with `settings`; untied embeddings, as docs/overlap.md requires of a bitwise overlap (the
    combined schedule runs the output layer's backward apart from the embedding's)."""
    fields = {**MHC_MOE_GPT, **settings}
    pattern = fields.pop("hybrid_layer_pattern", None)
    if pattern is None:
        return build_tiny_gpt(tiny_config(**fields), share_embeddings_and_output_weights=False)
    fields.pop("moe_layer_freq")  # the pattern places the MoE layers
    return build_tiny_hybrid(
        tiny_hybrid_config(pattern, **fields), pattern, share_embeddings_and_output_weights=False
    )


BASELINES = {schedule: _baseline(schedule) for schedule in SCHEDULES}

# The nodes of each layer of the schedule plans built, by layer state: (micro-batch, layer).
_layer_of_node_state = {}
_node_calls = []  # (micro-batch, layer, node name, "forward" or "backward") in call order
_update_node_streams = []  # the stream each MLP update node ran on


def _forward_step(data_iterator, model, return_schedule_plan=False):
    # The combined 1F1B schedule asks for the model's schedule plan, built from the same inputs,
    # in place of its output.
    if not return_schedule_plan:
        return forward_step(data_iterator, model)
    plan, loss_func = forward_step(data_iterator, model.build_schedule_plan)
    micro_batch = len({mb for mb, _ in _layer_of_node_state.values()})
    for index in range(plan.num_layers()):
        _layer_of_node_state[plan.get_layer(index).layer_state] = (micro_batch, index)
    return plan, loss_func


def _record_node_calls():
    """Wrap Megatron's TransformerLayerNode forward and backward to log the order they run in
    (the nodes themselves run unchanged)."""
    from megatron.core.models.common.utils import TransformerLayerNode

    for direction in ("forward", "backward"):
        run = getattr(TransformerLayerNode, direction)

        def logged(node, *args, _run=run, _direction=direction):
            _node_calls.append((*_layer_of_node_state[node.layer_state], node.name, _direction))
            if node.name == "mhc_mlp_update":
                _update_node_streams.append(node.stream)
            return _run(node, *args)

        setattr(TransformerLayerNode, direction, logged)


def _train_under_each_schedule(rank, world_size):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    initialize_model_parallel(expert_model_parallel_size=world_size)
    _record_node_calls()
    data = batches(seed=rank, num=MICROBATCHES)
    weights, rng_state = {}, None  # weights by baseline
    runs = {}
    for schedule, settings in SCHEDULES.items():
        gpt = _build(settings)
        config = gpt.config
        if rng_state is None:
            rng_state = (torch.get_rng_state(), get_cuda_rng_tracker().get_states())
        baseline = BASELINES[schedule]
        weights[baseline] = same_weights(gpt, weights.get(baseline))
        # The same dropout masks in every run.
        torch.set_rng_state(rng_state[0])
        get_cuda_rng_tracker().set_states(rng_state[1])
        contracts = []
        final_norm = getattr(gpt.decoder, "final_layernorm", None) or gpt.decoder.final_norm
        final_norm.register_forward_pre_hook(
            lambda _norm, args: contracts.append(args[0].shape[-1])
        )
        _layer_of_node_state.clear()
        _node_calls.clear()
        _update_node_streams.clear()
        MTPLossLoggingHelper.tracker.clear()
        losses, grads = bf16_training_losses_and_grads(gpt, data, STEPS, _forward_step)
        # The MTP loss of every micro-batch and step, summed (Megatron's logging tracker).
        mtp_losses = MTPLossLoggingHelper.tracker.get("loss_values")
        runs[schedule] = dict(
            losses=losses,
            grads=grads,
            node_calls=list(_node_calls),
            # The final norm's input width seen by its pre-hooks: n*C before the contract.
            contracts=contracts,
            hidden=config.hidden_size,
            schedule_plans=len({mb for mb, _ in _layer_of_node_state.values()}),
            moe_layers=count_moe_layers(gpt),
            model=type(gpt).__name__,
            # Whether every update node ran on the MLP HC modules' high-priority stream.
            updates_on_high_priority_stream=bool(_update_node_streams)
            and all(
                stream is gpt.decoder.layers[0].mlp_hyper_connection.update_stream.stream
                for stream in _update_node_streams
            )
            if config.mhc_mlp_high_priority_stream
            else None,
            mtp_losses=None if mtp_losses is None else mtp_losses.tolist(),
        )
    return runs


def _expected_nodes_of_a_micro_batch(direction):
    """(layer, node) in the order the schedule runs one micro-batch's nodes in `direction`."""
    nodes = []
    for layer, moe in enumerate(MOE_LAYER_FREQ):
        middle = ["moe_dispatch", "mlp", "moe_combine"] if moe else ["mlp"]
        for name in ["pre_dispatch_computation", *middle, "mhc_mlp_update"]:
            nodes.append((layer, name))
    return nodes if direction == "forward" else nodes[::-1]


@pytest.fixture(scope="module")
def runs_by_rank():
    # One set of processes for both tests.
    return run_distributed(_train_under_each_schedule, EXPERT_PARALLEL)


def test_mhc_moe_gpt_under_combined_1f1b_equals_plain_schedule_bitwise_on_cpu(runs_by_rank):
    for rank, runs in enumerate(runs_by_rank):
        assert runs["overlap"]["moe_layers"] == 2
        assert runs["overlap_moe_last_layer"]["moe_layers"] == 3
        assert runs["overlap_hybrid"]["moe_layers"] == 2
        assert runs["overlap_hybrid"]["model"] == "MHCHybridModel"
        assert runs["overlap_high_priority_stream"]["updates_on_high_priority_stream"] is True
        for schedule in SCHEDULES:
            run = runs[schedule]
            # One contract per micro-batch, right before the final norm (input n*C wide): the
            # final norm runs once, also after a MoE last layer.
            assert len(run["contracts"]) == STEPS * MICROBATCHES, (schedule, run["contracts"])
            assert all(width == run["hidden"] for width in run["contracts"]), schedule
            plain = runs[BASELINES[schedule]]
            if schedule == BASELINES[schedule]:
                assert run["schedule_plans"] == 0 and run["node_calls"] == []
                continue
            # Megatron's combined schedule ran: one schedule plan per micro-batch.
            assert run["schedule_plans"] == STEPS * MICROBATCHES, schedule
            assert run["losses"] == plain["losses"], (rank, schedule)
            assert run["mtp_losses"] == plain["mtp_losses"], (rank, schedule)
            if schedule.endswith("_mtp"):
                assert run["mtp_losses"][0] > 0, (rank, schedule)
            else:
                assert run["mtp_losses"] is None, (rank, schedule)
            for step, (plain_grads, grads) in enumerate(
                zip(plain["grads"], run["grads"], strict=True)
            ):
                assert plain_grads.keys() == grads.keys()
                for key, (grad, _) in plain_grads.items():
                    assert torch.equal(grads[key][0], grad), (rank, schedule, step, key)


def test_mlp_hc_update_node_runs_after_its_layers_combine_and_before_the_next_layer(runs_by_rank):
    calls = runs_by_rank[0]["overlap"]["node_calls"]
    for micro_batch in range(STEPS * MICROBATCHES):
        for direction in ("forward", "backward"):
            nodes = [
                (layer, name)
                for mb, layer, name, d in calls
                if mb == micro_batch and d == direction
            ]
            assert nodes == _expected_nodes_of_a_micro_batch(direction), (micro_batch, direction)
    # The forward of one micro-batch and the backward of the previous one are interleaved
    # node by node (the combined 1F1B schedule, not one micro-batch after the other).
    directions = [(mb, d) for mb, _, _, d in calls]
    assert any(
        directions[i : i + 2] == [(1, "forward"), (0, "backward")]
        for i in range(len(directions) - 1)
    )


# The nodes of the MTP layer plans of a micro-batch, in forward order, each plan a list.
MTP_PLAN_NODES = {
    # GPT: one plan around the MTP layer's (dense) inner layer.
    "overlap_mtp": [["pre_dispatch_computation", "mlp", "mhc_mlp_update", "mtp_post_process"]],
    # Hybrid `/*E`: the attention layer's plan enters the depth, the MoE layer's leaves it.
    "overlap_hybrid_mtp": [
        ["pre_dispatch_computation", "mlp", "mhc_mlp_update"],
        [
            "pre_dispatch_computation",
            "moe_dispatch",
            "mlp",
            "moe_combine",
            "mhc_mlp_update",
            "mtp_post_process",
        ],
    ],
}


@pytest.mark.parametrize("schedule", list(MTP_PLAN_NODES))
def test_mlp_update_and_mtp_post_process_are_nodes_of_their_own_in_order(runs_by_rank, schedule):
    calls = runs_by_rank[0][schedule]["node_calls"]
    plans = MTP_PLAN_NODES[schedule]
    first_mtp_plan = max(layer for _, layer, _, _ in calls) + 1 - len(plans)
    expected = [(first_mtp_plan + i, name) for i, names in enumerate(plans) for name in names]
    for micro_batch in range(STEPS * MICROBATCHES):
        for direction, order in (("forward", expected), ("backward", expected[::-1])):
            nodes = [
                (layer, name)
                for mb, layer, name, d in calls
                if mb == micro_batch and d == direction and layer >= first_mtp_plan
            ]
            assert nodes == order, (schedule, micro_batch, direction)


# Interleaved pipeline: EP=2 x PP=2 x VPP=2 on 4 processes, one layer per model chunk (the
# stage exchange [s, b*n, C] wraps around from the last stage to the next chunk of the first).
INTERLEAVED = dict(
    pipeline_model_parallel_size=2,
    virtual_pipeline_model_parallel_size=2,
    overlap_p2p_comm=True,
    batch_p2p_comm=False,
)
INTERLEAVED_HYBRID = dict(hybrid_layer_pattern="*E|*E|*E|*E")
INTERLEAVED_SCHEDULES = {
    "plain": dict(),
    "overlap": OVERLAP,
    "overlap_mhc_recompute": dict(**OVERLAP, mhc_recompute_layer_num=1),
    # A HybridModel of 4 stages ('|') on PP=2: 2 virtual stages of an attention and a MoE layer.
    "plain_hybrid": INTERLEAVED_HYBRID,
    "overlap_hybrid": dict(**OVERLAP, **INTERLEAVED_HYBRID),
}


def _interleaved_step_under_each_schedule(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.module import Float16Module

    from tests.unit.test_interleaved_pipeline import _chunks

    initialize_model_parallel(
        1, 2, virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=EXPERT_PARALLEL
    )
    data = batches(seed=parallel_state.get_expert_model_parallel_rank(), num=MICROBATCHES)
    weights, rng_state = {}, None  # weights by model (GPT, hybrid)
    runs = {}
    for schedule, settings in INTERLEAVED_SCHEDULES.items():
        fields = {**MHC_MOE_GPT, **INTERLEAVED, **settings}
        pattern = fields.pop("hybrid_layer_pattern", None)
        if pattern is None:
            config = tiny_config(**fields)
            chunks = _chunks(config)
        else:
            fields.pop("moe_layer_freq")  # the pattern places the MoE layers
            config = tiny_hybrid_config(pattern, **fields)
            chunks = [build_tiny_hybrid(config, pattern, vp_stage=vp_stage) for vp_stage in (0, 1)]
        if pattern not in weights:
            weights[pattern] = [
                {
                    name: value.clone() if isinstance(value, torch.Tensor) else value
                    for name, value in chunk.state_dict().items()
                }
                for chunk in chunks
            ]
        if rng_state is None:
            rng_state = (torch.get_rng_state(), get_cuda_rng_tracker().get_states())
        for chunk, chunk_weights in zip(chunks, weights[pattern], strict=True):
            chunk.load_state_dict(chunk_weights)
        torch.set_rng_state(rng_state[0])
        get_cuda_rng_tracker().set_states(rng_state[1])
        _layer_of_node_state.clear()
        outputs = run_schedule(
            [Float16Module(config, chunk) for chunk in chunks], data, _forward_step
        )
        runs[schedule] = dict(
            losses=[output["loss"].item() for output in outputs],
            grads={
                f"{index}.{name}": param.grad
                for index, chunk in enumerate(chunks)
                for name, param in chunk.named_parameters()
            },
            schedule_plans=len({mb for mb, _ in _layer_of_node_state.values()}),
        )
    return runs


def test_interleaved_pipeline_under_combined_1f1b_equals_plain_interleaved_bitwise_on_cpu():
    for rank, runs in enumerate(
        run_distributed(_interleaved_step_under_each_schedule, 2 * EXPERT_PARALLEL)
    ):
        assert runs["plain"]["schedule_plans"] == runs["plain_hybrid"]["schedule_plans"] == 0
        for schedule in ("overlap", "overlap_mhc_recompute", "overlap_hybrid"):
            plain = runs["plain_hybrid" if "hybrid" in schedule else "plain"]
            run = runs[schedule]
            # One plan per model chunk and micro-batch.
            assert run["schedule_plans"] == 2 * MICROBATCHES, (rank, schedule)
            assert run["losses"] == plain["losses"], (rank, schedule)
            assert run["grads"].keys() == plain["grads"].keys()
            for name, grad in plain["grads"].items():
                assert grad is not None, name
                assert torch.equal(run["grads"][name], grad), (rank, schedule, name)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(delay_wgrad_compute=True), "delay_wgrad_compute=True .*HybridModel"),
        (dict(enable_mhc_connections=False), "HybridModel needs mHC active"),
    ],
    ids=["delay_wgrad", "mhc_off"],
)
def test_hybrid_overlap_it_cannot_run_is_refused_before_building(settings, message):
    from megatron_mhc.models.hybrid import build_mhc_hybrid_model

    fields = {**MHC_MOE_GPT, **OVERLAP, **settings}
    fields.pop("moe_layer_freq")
    config = tiny_hybrid_config("*-*E", **fields)
    with pytest.raises(ValueError, match=message):
        build_mhc_hybrid_model(
            config, vocab_size=128, max_sequence_length=SEQ, hybrid_layer_pattern="*-*E"
        )
