"""Multi-latent attention (MLA) with mHC on the local spec: a GPT with MLA and a HybridModel with
MLA layers (`+`) train with Megatron's DDP, optimizer and schedule; n = 1 is Megatron's MLA GPT
bit for bit; identity init computes the baseline's function."""

import math

import pytest
import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_mhc.config import MHCMLATransformerConfig
from megatron_mhc.transformer.latent_attention import LatentDotProductAttention
from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.tiny_gpt import (
    CPU_MOE,
    MHC_4_STREAMS,
    SEQ,
    batches,
    build_tiny_gpt,
    causal_mask,
    logits,
    tiny_config,
    train_on_a_fixed_batch,
)
from tests.tiny_hybrid import build_tiny_hybrid, tiny_hybrid_config

SEED = 1234
# Key heads of qk_head_dim + qk_pos_emb_head_dim = 12 and value heads of 6, both unlike kv_channels
# (hidden 32 / 4 heads = 8), so the core attention's k_channels and v_channels both matter.
MLA = dict(
    config_class=MHCMLATransformerConfig,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=6,
    rope_type="rope",
)
HYBRID_PATTERN = "+-+E"


def _gpt(**overrides):
    return build_tiny_gpt(tiny_config(**MLA, **overrides))


def _hybrid(**overrides):
    return build_tiny_hybrid(
        tiny_hybrid_config(HYBRID_PATTERN, **MLA, **CPU_MOE, **overrides), HYBRID_PATTERN
    )


def _seeded(build, **overrides):
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    return build(**overrides).eval()


def _logits_against_baseline(build, overrides):
    """(baseline logits, candidate logits, candidate class name) of two models built with the
    same seed: the plain one and one with `overrides`."""
    tokens = batches(seed=7)[0][0]
    baseline, candidate = _seeded(build), _seeded(build, **overrides)
    with torch.no_grad():
        return logits(baseline, tokens), logits(candidate, tokens), type(candidate).__name__


def _train(build, steps):
    model = build(**MHC_4_STREAMS)
    attention = [
        type(layer.self_attention.core_attention)
        for layer in model.decoder.layers
        if hasattr(layer.self_attention, "core_attention")
    ]
    return train_on_a_fixed_batch(model, steps), attention


def _core_attention_against_sdpa():
    """LatentDotProductAttention and torch's scaled_dot_product_attention on the same causal
    query, key (12 wide) and value (6 wide) heads."""
    from megatron.core.transformer.enums import AttnMaskType

    config = tiny_config(**MLA)
    heads, k_channels, v_channels = config.num_attention_heads, 12, 6
    attention = LatentDotProductAttention(
        config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        k_channels=k_channels,
        v_channels=v_channels,
    )
    generator = torch.Generator().manual_seed(SEED)
    query, key = (torch.randn(SEQ, 2, heads, k_channels, generator=generator) for _ in range(2))
    value = torch.randn(SEQ, 2, heads, v_channels, generator=generator)
    got = attention(query, key, value, causal_mask())
    expected = (
        torch.nn.functional.scaled_dot_product_attention(
            *(x.permute(1, 2, 0, 3) for x in (query, key, value)), is_causal=True
        )
        .permute(2, 0, 1, 3)
        .reshape(SEQ, 2, heads * v_channels)
    )
    return got, expected


def _checks(rank, world_size):
    """Every check in one process (model-parallel state set up once)."""
    initialize_model_parallel(seed=SEED)
    return {
        "core_attention": _core_attention_against_sdpa(),
        "gpt_n1": _logits_against_baseline(
            _gpt, dict(enable_mhc_connections=True, mhc_num_residual_streams=1)
        ),
        "gpt_identity": _logits_against_baseline(_gpt, dict(MHC_4_STREAMS, mhc_init="identity")),
        "hybrid_identity": _logits_against_baseline(
            _hybrid, dict(MHC_4_STREAMS, mhc_init="identity")
        ),
        "gpt_training": _train(_gpt, steps=8),
        "hybrid_training": _train(_hybrid, steps=8),
    }


@pytest.fixture(scope="module")
def results():
    return run_distributed(_checks, 1, timeout_s=600)[0]


def test_latent_core_attention_is_softmax_attention_with_unequal_key_and_value_heads(results):
    got, expected = results["core_attention"]
    assert got.shape == expected.shape == (SEQ, 2, 4 * 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_one_stream_mla_gpt_is_megatrons_mla_gpt_bit_for_bit(results):
    base, got, kind = results["gpt_n1"]
    assert kind == "GPTModel"
    assert torch.equal(got, base)


@pytest.mark.parametrize("model", ["gpt", "hybrid"])
def test_identity_init_n4_computes_the_baseline_mla_function(results, model):
    base, got, kind = results[f"{model}_identity"]
    assert kind == {"gpt": "MHCGPTModel", "hybrid": "MHCHybridModel"}[model]
    scale = base.abs().max()
    torch.testing.assert_close(got / scale, base / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", ["gpt", "hybrid"])
def test_mhc_model_with_mla_trains(results, model):
    losses, attention = results[f"{model}_training"]
    assert attention == [LatentDotProductAttention] * (4 if model == "gpt" else 2)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_mla_config_keeps_mla_defaults_and_validates_the_mhc_fields():
    config = tiny_config(**MLA, **MHC_4_STREAMS)
    assert config.multi_latent_attention and config.normalization == "RMSNorm"
    assert config.mhc_active
    with pytest.raises(ValueError, match=r"MHCTransformerConfig.mhc_type='x' is invalid"):
        tiny_config(**MLA, mhc_type="x")


def test_deepseek_attention_layers_are_refused_on_the_local_spec_naming_the_pattern():
    from megatron_mhc.transformer.hybrid_specs import check_hybrid_layer_pattern

    with pytest.raises(
        ValueError,
        match=r"--hybrid-layer-pattern 'D-D-': layer types 'D' DeepSeek sparse attention need "
        r"--transformer-impl transformer_engine",
    ):
        check_hybrid_layer_pattern(tiny_hybrid_config("D-D-", **MLA, **MHC_4_STREAMS), "D-D-")
