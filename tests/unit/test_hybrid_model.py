"""HybridModel with mHC (local hybrid spec) through Megatron's real schedule on gloo processes:
a `*-*-*-*-` hybrid computes the function of the 4-layer GPT mHC model with the same weights,
n = 1 is the plain HybridModel, identity init (built or upcycled) computes the baseline's
function, its `hc` and `hc_static` modules start with the GPT's values module by module (the
same `hc_index` numbering), MoE `E` layers train, PP = 2 (`|` in the pattern; with more stages
than ranks, interleaved) equals PP = 1 and TP = 2 with sequence parallelism (the local hybrid
spec's norms) equals TP = 1."""

import math
import re

import pytest
import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_mhc.models.upcycling import check_upcycled_names, upcycle_state_dict
from tests import dist_utils
from tests.numerics import assert_close_to_scale
from tests.tiny_gpt import (
    CPU_MOE,
    FLOAT64,
    MHC_4_STREAMS,
    VOCAB,
    batches,
    build_tiny_gpt,
    count_moe_layers,
    forward_backward,
    logits,
    tiny_config,
    train_on_a_fixed_batch,
)
from tests.tiny_hybrid import build_tiny_hybrid, tiny_hybrid_config

SEED = 1234
_HYBRID_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def gpt_name(hybrid_name: str) -> str:
    """The GPT parameter holding hybrid parameter `hybrid_name` in a `*-*-...` hybrid: hybrid
    layers 2i (attention half) and 2i+1 (MLP half) are GPT layer i; the final norm is
    `final_layernorm` in GPT."""
    match = _HYBRID_LAYER.match(hybrid_name)
    if match is not None:
        return f"decoder.layers.{int(match[1]) // 2}.{match[2]}"
    return hybrid_name.replace("decoder.final_norm.", "decoder.final_layernorm.")


def _logits_and_grads(model, tokens):
    model.zero_grad()
    forward_backward(model, batches(seed=5))
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        out = logits(model, tokens)
    model.train()
    return out, grads


def _hybrid_against_gpt(overrides):
    """Logits and gradients of a GPT mHC model and of the `*-*-*-*-` hybrid holding its weights.

    The GPT recomputes its stream states per block of 1 GPT layer, the hybrid per block of 2
    hybrid layers: the same blocks of sublayers."""
    tokens = batches(seed=7)[0][0]
    gpt = build_tiny_gpt(tiny_config(**MHC_4_STREAMS, **overrides, mhc_recompute_layer_num=1))
    hybrid = build_tiny_hybrid(
        tiny_hybrid_config("*-*-*-*-", **MHC_4_STREAMS, **overrides, mhc_recompute_layer_num=2),
        "*-*-*-*-",
    )
    gpt_state = gpt.state_dict()
    hybrid.load_state_dict(
        {name: gpt_state[gpt_name(name)] for name in hybrid.state_dict()}, strict=True
    )
    gpt_logits, gpt_grads = _logits_and_grads(gpt, tokens)
    hybrid_logits, hybrid_grads = _logits_and_grads(hybrid, tokens)
    mapped = {gpt_name(name): grad for name, grad in hybrid_grads.items()}
    return gpt_logits, hybrid_logits, gpt_grads, mapped, hybrid.decoder.recompute_block_size


def _baseline_and_candidate(pattern, baseline_overrides, candidate_overrides, upcycle):
    """Logits and parameter names of a baseline HybridModel and of a candidate built with the
    same seed (or, with `upcycle`, another seed and the baseline's upcycled state dict)."""
    tokens = batches(seed=7)[0][0]
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    baseline = build_tiny_hybrid(tiny_hybrid_config(pattern, **baseline_overrides), pattern)
    config = tiny_hybrid_config(pattern, **baseline_overrides, **candidate_overrides)
    candidate_seed = SEED + 1 if upcycle else SEED
    torch.manual_seed(candidate_seed)
    model_parallel_cuda_manual_seed(candidate_seed)
    candidate = build_tiny_hybrid(config, pattern)
    if upcycle:
        check_upcycled_names(baseline.state_dict(), candidate.state_dict())
        candidate.load_state_dict(upcycle_state_dict(baseline.state_dict(), config), strict=True)
    baseline.eval()
    candidate.eval()
    with torch.no_grad():
        return dict(
            baseline=logits(baseline, tokens),
            candidate=logits(candidate, tokens),
            baseline_names=[n for n, _ in baseline.named_parameters()],
            names=[n for n, _ in candidate.named_parameters()],
            stack=type(candidate.decoder).__name__,
            model=type(candidate).__name__,
        )


def _train(overrides, pattern, steps):
    model = build_tiny_hybrid(tiny_hybrid_config(pattern, **overrides), pattern)
    moe_layers = count_moe_layers(model)
    return train_on_a_fixed_batch(model, steps), moe_layers


HC_TYPES = ("hc", "hc_static")


def _hc_modules_of_hybrid_and_gpt(mhc_type):
    """{hybrid HC parameter: (its initial value, that of the GPT parameter in the same place)}
    for a `*-*-*-*-` hybrid and the 4-layer GPT of `mhc_type`. For the `hc` types every initial
    value is deterministic (W = 0, B_pre = e_(hc_index mod n), B_post = 1, B_res = I, gating
    0.01), so they must be equal whatever order the stacks draw random numbers in."""
    overrides = dict(MHC_4_STREAMS, mhc_type=mhc_type)
    gpt = build_tiny_gpt(tiny_config(**overrides)).state_dict()
    hybrid = build_tiny_hybrid(tiny_hybrid_config("*-*-*-*-", **overrides), "*-*-*-*-")
    return {
        name: (value, gpt[gpt_name(name)])
        for name, value in hybrid.state_dict().items()
        if "_hyper_connection." in name
    }


IDENTITY_CASES = {
    f"{contract}_{how}": (contract, how == "upcycled")
    for contract in ("mean", "learned")
    for how in ("built", "upcycled")
}


def _single_process_checks(rank, world_size):
    """Every single-process check in one process (model-parallel state set up once)."""
    dist_utils.initialize_model_parallel(seed=SEED)
    results = {"gpt": _hybrid_against_gpt(dict(mhc_output_contract="learned"))}
    for name, overrides in {
        "n1": dict(enable_mhc_connections=True, mhc_num_residual_streams=1),
        "disabled": dict(enable_mhc_connections=False),
    }.items():
        results[name] = _baseline_and_candidate("*-*E", CPU_MOE, overrides, upcycle=False)
    for name, (contract, upcycle) in IDENTITY_CASES.items():
        results[name] = _baseline_and_candidate(
            "*-*E",
            CPU_MOE,
            dict(MHC_4_STREAMS, mhc_init="identity", mhc_output_contract=contract),
            upcycle,
        )
    results["moe_training"] = _train(dict(MHC_4_STREAMS, **CPU_MOE), "*E*E", steps=20)
    results["hc_initial_values"] = {
        mhc_type: _hc_modules_of_hybrid_and_gpt(mhc_type) for mhc_type in HC_TYPES
    }
    return results


@pytest.fixture(scope="module")
def single_process():
    return dist_utils.run_distributed(_single_process_checks, 1, timeout_s=600)[0]


def test_hybrid_attention_mlp_pattern_is_the_gpt_mhc_model_forward_and_backward(single_process):
    gpt_logits, hybrid_logits, gpt_grads, hybrid_grads, hybrid_block = single_process["gpt"]
    assert hybrid_block == 2
    assert hybrid_grads.keys() == gpt_grads.keys()
    assert sum("_hyper_connection." in name for name in gpt_grads) == 4 * 2 * 3
    assert any("mhc_head" in name for name in gpt_grads)
    # The same modules on the same inputs in the same order: bitwise.
    assert torch.equal(hybrid_logits, gpt_logits)
    for name, grad in gpt_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(hybrid_grads[name], grad), name


@pytest.mark.parametrize("case", ["n1", "disabled"])
def test_one_stream_or_disabled_is_the_plain_hybrid_model_bit_for_bit(single_process, case):
    result = single_process[case]
    assert result["model"] == "HybridModel" and result["stack"] == "SpecNormHybridStack"
    assert result["names"] == result["baseline_names"]
    assert torch.equal(result["candidate"], result["baseline"])


@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_identity_init_n4_computes_the_baseline_hybrid_function(single_process, case):
    result = single_process[case]
    assert result["stack"] == "HyperConnectionHybridStack"
    assert set(result["baseline_names"]) < set(result["names"])
    base, got = result["baseline"], result["candidate"]
    assert base.shape == got.shape == (2, 16, VOCAB)
    scale = base.abs().max()
    torch.testing.assert_close(got / scale, base / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mhc_type", HC_TYPES)
def test_hybrid_numbers_its_hc_modules_as_the_gpt_module_by_module(single_process, mhc_type):
    """`hc_index` decides which stream an `hc` / `hc_static` module starts reading: hybrid layer
    j (one sublayer) holds module j, as the half of GPT layer j // 2 in the same place."""
    modules = single_process["hc_initial_values"][mhc_type]
    parameters = ("base", "fn", "scale") if mhc_type == "hc" else ("base",)
    assert {name.rsplit(".", 1)[1] for name in modules} == set(parameters)
    assert len(modules) == 8 * len(parameters)
    streams_read = []
    for name, (hybrid_value, gpt_value) in modules.items():
        assert torch.equal(hybrid_value, gpt_value), name
        if name.endswith(".base"):
            streams_read.append(int(hybrid_value[:4].argmax()))
    # Module j reads stream j mod 4: the numbering is visible in these values.
    assert streams_read == [j % 4 for j in range(8)]


def test_hybrid_with_moe_layers_trains(single_process):
    losses, moe_layers = single_process["moe_training"]
    assert moe_layers == 2
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses


# (TP, PP, VPP, sequence_parallel, pattern); the rest of the 2 ranks is data parallel. More
# stages in the pattern ('|') than PP ranks make virtual stages.
LAYOUTS = [
    (1, 1, None, False, "*-*E*-*E"),
    (1, 2, None, False, "*-*E|*-*E"),
    (1, 2, 2, False, "*-|*E|*-|*E"),
    (2, 1, None, True, "*-*E*-*E"),
]
NUM_MICROBATCHES = 4  # the interleaved schedule needs a multiple of PP


def _per_layout(rank, world_size, overrides):
    """Same weights in every layout; one forward+backward of four micro-batches each through
    Megatron's DDP, schedule and finalize_model_grads, in float64 (see
    test_parallel_equivalence.py)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    torch.set_default_dtype(torch.float64)
    results, full = {}, None
    for tp, pp, vpp, sequence_parallel, pattern in LAYOUTS:
        dist_utils.initialize_model_parallel(
            tp, pp, seed=SEED, virtual_pipeline_model_parallel_size=vpp
        )
        config = tiny_hybrid_config(
            pattern,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            sequence_parallel=sequence_parallel,
            **FLOAT64,
            # Megatron-Core's default batched P2P lets the two sends of PP=2 to the same peer
            # swap under the interleaved schedule; megatron.training sets these for it.
            overlap_p2p_comm=vpp is not None,
            batch_p2p_comm=vpp is None,
            **overrides,
        )
        config.finalize_model_grads_func = finalize_model_grads
        chunks = [
            build_tiny_hybrid(config, pattern, vp_stage=vp_stage)
            for vp_stage in ([None] if vpp is None else range(vpp))
        ]
        blocks = []
        for chunk in chunks:
            full = dist_utils.same_weights(chunk, full)
            blocks.append(chunk.decoder.recompute_block_size)
        chunks = [
            DistributedDataParallel(config, DistributedDataParallelConfig(), chunk)
            for chunk in chunks
        ]
        loss = forward_backward(chunks, batches(num=NUM_MICROBATCHES))
        grads = {}
        for chunk in chunks:
            grads.update(dist_utils.export_grads(chunk.module))
        results[(tp, pp, vpp)] = (loss, grads, blocks)
        dist_utils.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def per_layout():
    # qk_layernorm: the attention's own norms run under sequence parallelism too.
    overrides = dict(
        MHC_4_STREAMS,
        **CPU_MOE,
        mhc_output_contract="learned",
        mhc_recompute_layer_num="auto",
        qk_layernorm=True,
    )
    return dist_utils.run_distributed(_per_layout, 2, overrides, timeout_s=600)


@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2", "pp2_vpp2"])
def test_hybrid_pipeline_split_by_the_pattern_equals_pp1(per_layout, vpp):
    # eq. 20 with L = the stage's hybrid layers: 8 layers -> L_r = 2, 4 -> 1, 2 -> 1.
    assert [r[(1, 1, None)][2] for r in per_layout] == [[2], [2]]
    assert [r[(1, 2, vpp)][2] for r in per_layout] == [[1] * (vpp or 1)] * 2
    reference_loss = per_layout[0][(1, 1, None)][0]
    assert per_layout[0][(1, 2, vpp)][0] is None
    assert per_layout[1][(1, 2, vpp)][0] == reference_loss
    reference = dist_utils.merge_full_grads([r[(1, 1, None)][1] for r in per_layout])
    assert sum("_hyper_connection." in name for name in reference) == 8 * 3
    grads = dist_utils.merge_full_grads([r[(1, 2, vpp)][1] for r in per_layout])
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        want = reference[name]
        # PP = 1 runs 2 data-parallel replicas: DDP halves each replica's gradient before the
        # sum, which drops the last bit of fp32 subnormals (the HC projections' gradients reach
        # 1e-39); the rest agrees to float64 rounding.
        assert_close_to_scale(grad, want, 1e-10, name, atol_scale=1e-12)


def test_hybrid_tp2_sequence_parallel_equals_tp1(per_layout):
    reference_loss = per_layout[0][(1, 1, None)][0]
    for loss in (r[(2, 1, None)][0] for r in per_layout):
        assert abs(loss - reference_loss) <= 1e-5 * abs(reference_loss), loss
    reference = dist_utils.merge_full_grads([r[(1, 1, None)][1] for r in per_layout])
    grads = dist_utils.merge_full_grads([r[(2, 1, None)][1] for r in per_layout])
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        want = reference[name]
        # Relative to the tensor's scale: TP sums partial products in another order.
        assert_close_to_scale(grad, want, 1e-5, name)


@pytest.mark.parametrize(
    "pattern,overrides,message",
    [
        (
            "*-M-",
            dict(MHC_4_STREAMS, transformer_impl="transformer_engine"),
            r"hybrid_layer_pattern='\*-M-' is invalid: "
            r"Mamba layers \('M'\) are not supported with mHC",
        ),
        (
            "*-G-",
            MHC_4_STREAMS,
            r"--hybrid-layer-pattern '\*-G-': layer types 'G' gated delta net need "
            r"--transformer-impl transformer_engine .*; the local spec \(--transformer-impl "
            r"local\) builds '\*' attention, '\+' multi-latent attention, '-' MLP, 'E' MoE",
        ),
        (
            "+-+-",
            MHC_4_STREAMS,
            r"hybrid_layer_pattern='\+-\+-' is invalid: layer types \['\+'\] "
            r"\(multi-latent attention\) need an MLATransformerConfig",
        ),
        (
            "*-*x",
            MHC_4_STREAMS,
            r"--hybrid-layer-pattern '\*-\*x': 'x': no layer type has that symbol; the local "
            r"spec",
        ),
        (
            "*-*E",
            MHC_4_STREAMS,
            r"MHCTransformerConfig.num_moe_experts=None is invalid: .*MoE layers \('E'\)",
        ),
        (
            "*-*-/*-",
            MHC_4_STREAMS,
            r"MHCTransformerConfig.mtp_num_layers=None is invalid with "
            r"hybrid_layer_pattern='\*-\*-/\*-': .* \(1 here\)",
        ),
        (
            "*-*-",
            dict(MHC_4_STREAMS, mtp_num_layers=1),
            r"MHCTransformerConfig.mtp_num_layers=1 is invalid "
            r"with hybrid_layer_pattern='\*-\*-': .* \(0 here\)",
        ),
        (
            "*-*-/G-",
            dict(MHC_4_STREAMS, mtp_num_layers=1),
            r"--hybrid-layer-pattern '\*-\*-/G-': layer types 'G' gated delta net need "
            r"--transformer-impl transformer_engine",
        ),
    ],
    ids=[
        "mamba_with_mhc",
        "gdn_local",
        "mla_config",
        "bad_symbol",
        "moe_without_experts",
        "mtp_part_without_mtp_num_layers",
        "mtp_num_layers_without_mtp_part",
        "gdn_in_mtp_part",
    ],
)
def test_unbuildable_pattern_is_refused_before_building_naming_the_field(
    pattern, overrides, message
):
    from megatron_mhc.models.hybrid import build_mhc_hybrid_model

    with pytest.raises(ValueError, match=message):
        build_mhc_hybrid_model(tiny_config(**overrides), VOCAB, 16, pattern)
