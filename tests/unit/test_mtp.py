"""Multi-token prediction with mHC (`mtp_num_layers`; a HybridModel's `/` pattern part) through
Megatron's real schedule on gloo processes: GPT and HybridModel train (main and MTP loss fall);
PP = 2 (the MTP block on the last stage), TP = 2 and TP = 2 with sequence parallelism give the
loss, MTP loss and gradients of one rank; one stream (or mHC off) is Megatron's own MTP model bit
for bit; a `*-*-*-*-/*-` hybrid is the GPT MTP model with the same weights; with the identity
init the n-stream MTP computes the function of Megatron's single-stream MTP; full or mHC block
recompute trains bitwise like none."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_mhc.training.gpt_step import check_mtp_arguments
from tests import dist_utils
from tests.numerics import assert_close_to_scale
from tests.tiny_gpt import (
    FLOAT64,
    MHC_4_STREAMS,
    SEQ,
    VOCAB,
    batches,
    build_tiny_gpt,
    forward_backward,
    tiny_config,
    train_on_a_fixed_batch,
)
from tests.tiny_hybrid import build_tiny_hybrid, tiny_hybrid_config
from tests.unit.test_hybrid_model import gpt_name

STEPS = 6
# The tiny GPT's 4 layers as hybrid layers, and one MTP depth of an attention and an MLP layer.
HYBRID_MAIN, HYBRID_MTP = "*-*-*-*-", "/*-"
_MTP_HYBRID_LAYER = re.compile(r"^(mtp\.layers\.\d+\.mtp_model_layer\.)layers\.\d+\.")


def _hybrid_pattern(pipeline_stages: int = 1) -> str:
    """HYBRID_MAIN split into `pipeline_stages` equal stages ('|'), then HYBRID_MTP."""
    size = len(HYBRID_MAIN) // pipeline_stages
    stages = [HYBRID_MAIN[i : i + size] for i in range(0, len(HYBRID_MAIN), size)]
    return "|".join(stages) + HYBRID_MTP


def _build(hybrid: bool, pipeline_stages: int = 1, **config_fields):
    """The tiny GPT, or the tiny hybrid of `_hybrid_pattern`, for `config_fields`."""
    if not hybrid:
        return build_tiny_gpt(tiny_config(**config_fields))
    pattern = _hybrid_pattern(pipeline_stages)
    return build_tiny_hybrid(tiny_hybrid_config(pattern, **config_fields), pattern)


@pytest.fixture(scope="module")
def per_layout():
    """Every rank's results of `_step_per_layout` for an mHC GPT with one MTP layer, and for
    the mHC hybrid `*-*-*-*-/*-` (with PP = 2, `*-*-|*-*-/*-`)."""
    return {
        "gpt": dist_utils.run_distributed(
            _step_per_layout, 2, dict(MHC_4_STREAMS, mtp_num_layers=1), False
        ),
        "hybrid": dist_utils.run_distributed(
            _step_per_layout, 2, dict(MHC_4_STREAMS, mtp_num_layers=1), True
        ),
    }


def _mtp_losses() -> list:
    """The MTP losses (one per depth) tracked since the last call, summed over micro-batches."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker["loss_values"].tolist()
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    return values


def _train(rank, world_size, variants, hybrid=False):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    results = {}
    for name, overrides in variants.items():
        MTPLossLoggingHelper.tracker.clear()  # sized by the first run's number of depths
        dist_utils.initialize_model_parallel()
        results[name] = train_on_a_fixed_batch(
            _build(hybrid, **overrides),
            STEPS,
            lambda model, data: (forward_backward(model, data), _mtp_losses()),
        )
        dist_utils.destroy_model_parallel()
    return results


TRAINED = {
    "mtp1": dict(MHC_4_STREAMS, mtp_num_layers=1),
    "mtp2_learned_contract": dict(MHC_4_STREAMS, mtp_num_layers=2, mhc_output_contract="learned"),
}


@pytest.mark.parametrize("hybrid", [False, True], ids=["gpt", "hybrid"])
def test_model_with_mtp_trains_with_finite_falling_main_and_mtp_losses(hybrid):
    variants = TRAINED
    if hybrid:
        # The pattern sets the MTP depths.
        variants = {"mtp1": TRAINED["mtp1"]}
    results = dist_utils.run_distributed(_train, 1, variants, hybrid)[0]
    for name, steps in results.items():
        depths = TRAINED[name]["mtp_num_layers"]
        main = [loss for loss, _ in steps]
        assert all(len(mtp) == depths for _, mtp in steps), name
        assert all(math.isfinite(v) for v in main), (name, main)
        assert main[-1] < main[0] - 0.1, (name, main)
        for depth in range(depths):
            mtp = [losses[depth] for _, losses in steps]
            assert all(math.isfinite(v) and v > 0 for v in mtp), (name, depth, mtp)
            assert mtp[-1] < mtp[0] - 0.1, (name, depth, mtp)


# (TP, PP, sequence parallel) on 2 processes; the rest is data parallel.
LAYOUTS = [(1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True)]


def _step_per_layout(rank, world_size, overrides, hybrid):
    """The same weights in every layout; one forward-backward of two micro-batches each, in
    float64 (what is compared is the partitioning of the math)."""
    from megatron.core import parallel_state

    torch.set_default_dtype(torch.float64)
    results, full = {}, None
    for tp, pp, sequence_parallel in LAYOUTS:
        dist_utils.initialize_model_parallel(tp, pp)
        model = _build(
            hybrid,
            pipeline_stages=pp,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=sequence_parallel,
            **FLOAT64,
            **overrides,
        )
        full = dist_utils.same_weights(model, full)
        loss = forward_backward(model, batches())
        if sequence_parallel:
            # What finalize_model_grads does: each rank saw its share of the tokens.
            for param in model.parameters():
                if getattr(param, "sequence_parallel", False):
                    torch.distributed.all_reduce(
                        param.grad, group=parallel_state.get_tensor_model_parallel_group()
                    )
        mtp = _mtp_losses() if loss is not None else None
        results[(tp, pp, sequence_parallel)] = (loss, mtp, dist_utils.export_grads(model))
        dist_utils.destroy_model_parallel()
    return results


@pytest.mark.parametrize("model", ["gpt", "hybrid"])
@pytest.mark.parametrize(
    "layout,rtol",
    [
        ((1, 2, False), 1e-10),  # the same ops on the same values, split over two stages
        # TP sums partial products in another order (and Megatron's vocab-parallel cross entropy
        # stays fp32): the tolerance of tests/unit/test_parallel_equivalence.py.
        ((2, 1, False), 1e-5),
        ((2, 1, True), 1e-5),
    ],
    ids=["pp2", "tp2", "tp2_sequence_parallel"],
)
def test_parallel_layouts_with_mtp_match_one_rank(per_layout, model, layout, rtol):
    per_layout = per_layout[model]
    loss, mtp, _ = per_layout[0][(1, 1, False)]
    reference = dist_utils.merge_full_grads([r[(1, 1, False)][2] for r in per_layout])
    assert any(name.startswith("mtp.") and "hyper_connection" in name for name in reference)
    assert any(name.startswith("mtp.") and "mhc_head" in name for name in reference)
    # The losses exist on the last stage only (the MTP block's stage).
    last_stage = [r[layout] for r in per_layout if r[layout][0] is not None]
    assert len(last_stage) == 2 // layout[1]
    for got_loss, got_mtp, _ in last_stage:
        assert got_loss == pytest.approx(loss, rel=rtol)
        assert got_mtp == pytest.approx(mtp, rel=rtol)
    grads = dist_utils.merge_full_grads([r[layout][2] for r in per_layout])
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        want = reference[name]
        assert torch.isfinite(grad).all() and want.abs().max() > 0, name
        assert_close_to_scale(grad, want, rtol, f"{layout} {name}")


def _megatron_mtp_gpt(config):
    """Megatron's own GPTModel with its own local decoder and MTP specs."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    decoder_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return GPTModel(
        config,
        transformer_layer_spec=decoder_spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        mtp_block_spec=get_gpt_mtp_block_spec(config, decoder_spec, use_transformer_engine=False),
        position_embedding_type="rope",
    )


def _megatron_mtp_hybrid(config):
    """Megatron's own HybridModel on the project's local hybrid spec (Megatron ships none)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_mhc.transformer.hybrid_specs import get_local_hybrid_stack_spec

    return HybridModel(
        config,
        hybrid_stack_spec=get_local_hybrid_stack_spec(config),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hybrid_layer_pattern=_hybrid_pattern(),
        position_embedding_type="rope",
    )


def _loss_mtp_loss_and_grads(model):
    loss = forward_backward(model, batches())
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return loss, _mtp_losses(), grads


def _plain_and_candidate(rank, world_size, overrides, hybrid):
    results = []
    for megatron_model in (True, False):
        dist_utils.initialize_model_parallel(seed=1234)
        if not megatron_model:
            model = _build(hybrid, mtp_num_layers=1, **overrides)
        elif hybrid:
            model = _megatron_mtp_hybrid(
                tiny_hybrid_config(_hybrid_pattern(), mtp_num_layers=1, **overrides)
            )
        else:
            model = _megatron_mtp_gpt(tiny_config(mtp_num_layers=1, **overrides))
        results.append((type(model).__name__, _loss_mtp_loss_and_grads(model)))
        dist_utils.destroy_model_parallel()
    return results


@pytest.mark.parametrize("hybrid", [False, True], ids=["gpt", "hybrid"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(enable_mhc_connections=True, mhc_num_residual_streams=1),
        dict(enable_mhc_connections=False, mhc_num_residual_streams=4),
    ],
    ids=["n1", "disabled"],
)
def test_one_stream_or_disabled_mtp_model_is_megatrons_bit_for_bit(overrides, hybrid):
    (_, (loss, mtp, grads)), (kind, (got_loss, got_mtp, got_grads)) = dist_utils.run_distributed(
        _plain_and_candidate, 1, overrides, hybrid
    )[0]
    assert kind == ("HybridModel" if hybrid else "GPTModel")
    assert got_loss == loss and got_mtp == mtp
    assert list(got_grads) == list(grads)
    assert any(name.startswith("mtp.layers.0.eh_proj") for name in grads)
    for name, grad in grads.items():
        assert torch.equal(got_grads[name], grad), name


def _gpt_name(hybrid_name: str) -> str:
    """The parameter of the GPT MTP model holding `hybrid_name` of the `*-*-*-*-/*-` hybrid: the
    MTP depth's hybrid layers 0 (attention) and 1 (MLP) are the halves of its GPT layer."""
    return gpt_name(_MTP_HYBRID_LAYER.sub(r"\1", hybrid_name))


def _gpt_and_hybrid(rank, world_size):
    dist_utils.initialize_model_parallel(seed=1234)
    gpt = _build(False, **MHC_4_STREAMS, mtp_num_layers=1)
    hybrid = _build(True, **MHC_4_STREAMS, mtp_num_layers=1)
    gpt_state = gpt.state_dict()
    hybrid.load_state_dict(
        {name: gpt_state[_gpt_name(name)] for name in hybrid.state_dict()}, strict=True
    )
    (loss, mtp, grads), (got_loss, got_mtp, got_grads) = (
        _loss_mtp_loss_and_grads(model) for model in (gpt, hybrid)
    )
    return (
        type(hybrid).__name__,
        (loss, mtp, grads),
        (got_loss, got_mtp, {_gpt_name(name): grad for name, grad in got_grads.items()}),
    )


def test_hybrid_mtp_is_the_gpt_mtp_model_with_the_same_weights_bit_for_bit():
    """`*-*-*-*-/*-` holds the GPT MTP model's modules (decoder and MTP layer) and runs them on
    the same values in the same order: main loss, MTP loss and every gradient bitwise."""
    kind, (loss, mtp, grads), (got_loss, got_mtp, got_grads) = dist_utils.run_distributed(
        _gpt_and_hybrid, 1
    )[0]
    assert kind == "MHCHybridModel"
    assert got_loss == loss and got_mtp == mtp
    assert got_grads.keys() == grads.keys()
    assert sum(name.startswith("mtp.") and "_hyper_connection." in name for name in grads) == 6
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(got_grads[name], grad), name


def _upcycled_mtp_state_dict(plain_state_dict: dict, candidate_state_dict: dict) -> dict:
    """The plain model's weights in the identity-initialised mHC model: shared names as they
    are, `eh_proj` = [e_proj | h_proj] (Megatron concatenates the embedding first)."""
    state = dict(candidate_state_dict)
    for name, value in plain_state_dict.items():
        if name.endswith("._extra_state"):
            continue
        if name.endswith(".eh_proj.weight"):
            prefix = name[: -len("eh_proj.weight")]
            state[prefix + "e_proj.weight"], state[prefix + "h_proj.weight"] = value.chunk(2, dim=1)
        else:
            state[name] = value
    return state


def _identity_against_plain(rank, world_size, overrides):
    torch.set_default_dtype(torch.float64)
    config_fields = dict(mtp_num_layers=1, **FLOAT64, layernorm_epsilon=0.0)
    dist_utils.initialize_model_parallel(seed=1234)
    plain = build_tiny_gpt(tiny_config(**config_fields))
    candidate = build_tiny_gpt(tiny_config(**config_fields, **overrides))
    candidate.load_state_dict(
        _upcycled_mtp_state_dict(plain.state_dict(), candidate.state_dict()), strict=True
    )
    return [
        (type(model).__name__, forward_backward(model, batches()), _mtp_losses())
        for model in (plain, candidate)
    ]


def test_identity_init_n4_mtp_computes_the_single_stream_mtp_function():
    """Replicated streams through identity HC modules and heads: each stream's e_proj + h_proj
    is the plain eh_proj, so main and MTP losses are the plain model's.

    Exact with both epsilons 0: mhc_eps = 0 gives H_pre = 1/n and head weights 1/n, and
    layernorm_epsilon = 0 makes hnorm(final_norm(x)), what Megatron's MTP reads (the decoder
    output), equal hnorm(x), what DeepSeek-V4's reads (the streams before the final norm), while
    the final norm's gain is still 1.
    """
    identity = dict(MHC_4_STREAMS, mhc_init="identity", mhc_output_contract="learned", mhc_eps=0.0)
    (_, loss, mtp), (kind, got_loss, got_mtp) = dist_utils.run_distributed(
        _identity_against_plain, 1, identity
    )[0]
    assert kind == "MHCGPTModel"
    assert got_loss == pytest.approx(loss, rel=1e-10)
    assert got_mtp == pytest.approx(mtp, rel=1e-10)


@pytest.mark.parametrize(
    "untie,pipeline,refused",
    [
        (False, 2, True),
        (True, 2, False),
        (False, 1, False),
    ],
)
def test_mtp_with_tied_embeddings_over_pipeline_stages_is_refused(untie, pipeline, refused):
    """megatron-core 0.19.2 cannot save such a model: refused before training, naming it."""
    args = SimpleNamespace(
        mtp_num_layers=1,
        pipeline_model_parallel_size=pipeline,
        untie_embeddings_and_output_weights=untie,
    )
    if not refused:
        check_mtp_arguments(args)
        return
    with pytest.raises(
        ValueError,
        match="mtp_num_layers=1 with pipeline_model_parallel_size=2 "
        "needs --untie-embeddings-and-output-weights",
    ):
        check_mtp_arguments(args)


RECOMPUTED = {
    "none": dict(MHC_4_STREAMS, mtp_num_layers=1),
    # Megatron's full recompute reruns the MTP layer on the stream state in backward.
    "full": dict(
        MHC_4_STREAMS,
        mtp_num_layers=1,
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    ),
    # mHC's block recompute frees the decoder's inner stream states; the MTP block reads the
    # stage output, which the manager keeps.
    "mhc_blocks": dict(MHC_4_STREAMS, mtp_num_layers=1, mhc_recompute_layer_num=2),
}


def test_recompute_with_mtp_trains_bitwise_like_no_recompute():
    results = dist_utils.run_distributed(_train, 1, RECOMPUTED)[0]
    assert results["full"] == results["none"]
    assert results["mhc_blocks"] == results["none"]
