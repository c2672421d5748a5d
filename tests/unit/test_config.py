"""MHCTransformerConfig: defaults, and every bad value rejected on creation naming its field."""

import dataclasses
import typing

import pytest
import torch

from megatron_mhc.config import MHCTransformerConfig

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, enable_mhc_connections=True)


def test_defaults_follow_the_paper():
    config = MHCTransformerConfig(**TINY)
    assert config.mhc_num_residual_streams == 4
    assert config.mhc_type == "mhc"
    assert config.mhc_sinkhorn_iterations == 20
    assert config.mhc_init_gating_factor == 0.01
    assert config.mhc_init == "default"
    assert config.mhc_output_contract == "mean"
    assert config.mhc_kernel_backend == "auto"
    assert config.mhc_active


def test_every_choice_of_an_annotated_field_is_a_valid_config():
    # The --mhc-* flags offer the Literal annotations' values as their choices.
    choices = {
        f.name: typing.get_args(f.type)
        for f in dataclasses.fields(MHCTransformerConfig)
        if f.name.startswith("mhc_") and typing.get_origin(f.type) is typing.Literal
    }
    assert choices.keys() == {"mhc_type", "mhc_init", "mhc_output_contract", "mhc_kernel_backend"}
    for name, values in choices.items():
        for value in values:
            assert getattr(MHCTransformerConfig(**TINY, **{name: value}), name) == value
    assert MHCTransformerConfig(**TINY, mhc_recompute_layer_num="auto").mhc_recompute_layer_num


@pytest.mark.parametrize(
    "overrides",
    [
        dict(enable_mhc_connections=False),
        dict(mhc_num_residual_streams=1),
    ],
)
def test_one_stream_or_disabled_is_not_active(overrides):
    assert not MHCTransformerConfig(**{**TINY, **overrides}).mhc_active


BAD_CONFIGS = [
    ("enable_mhc_connections", dict(enable_mhc_connections="yes")),
    ("mhc_num_residual_streams", dict(mhc_num_residual_streams=0)),
    ("mhc_num_residual_streams", dict(mhc_num_residual_streams=2.5)),
    ("mhc_num_residual_streams", dict(mhc_num_residual_streams=True)),
    ("mhc_type", dict(mhc_type="mHC")),
    ("mhc_sinkhorn_iterations", dict(mhc_sinkhorn_iterations=0)),
    ("mhc_eps", dict(mhc_eps=-1e-6)),
    ("mhc_eps", dict(mhc_eps=float("nan"))),
    ("mhc_norm_eps", dict(mhc_norm_eps=0.0)),
    ("mhc_norm_eps", dict(mhc_norm_eps="1e-6")),
    ("mhc_init_gating_factor", dict(mhc_init_gating_factor=float("inf"))),
    ("mhc_init", dict(mhc_init="zeros")),
    ("mhc_init", dict(mhc_type="hc", mhc_init="identity")),
    ("mhc_output_contract", dict(mhc_output_contract="sum")),
    ("mhc_kernel_backend", dict(mhc_kernel_backend="cuda")),
    ("mhc_mlp_high_priority_stream", dict(mhc_mlp_high_priority_stream="yes")),
    ("cuda_graph_impl", dict(cuda_graph_impl="local")),
    (
        "pipeline_model_parallel_layout",
        dict(
            mtp_num_layers=1,
            num_layers=4,
            pipeline_model_parallel_size=2,
            pipeline_model_parallel_layout="Ett|ttmL",
            pipeline_dtype=torch.float32,
        ),
    ),
    ("mlp_chunks_for_training", dict(mlp_chunks_for_training=2)),
    ("cpu_offloading", dict(cpu_offloading=True, cpu_offloading_num_layers=1)),
    (
        "apply_residual_connection_post_layernorm",
        dict(apply_residual_connection_post_layernorm=True),
    ),
    ("fused_residual_rmsnorm", dict(fused_residual_rmsnorm=True, normalization="RMSNorm")),
]


@pytest.mark.parametrize(
    "field,overrides", BAD_CONFIGS, ids=[f"{field}-{i}" for i, (field, _) in enumerate(BAD_CONFIGS)]
)
def test_bad_config_is_rejected_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"MHCTransformerConfig\.{field}=") as err:
        MHCTransformerConfig(**{**TINY, **overrides})
    assert "invalid" in str(err.value)


@pytest.mark.parametrize("variable_seq_lengths", [False, True])
def test_interleaved_pipeline_is_accepted(variable_seq_lengths):
    config = MHCTransformerConfig(
        **{
            **TINY,
            "num_layers": 4,
            "pipeline_model_parallel_size": 2,
            "virtual_pipeline_model_parallel_size": 2,
            "variable_seq_lengths": variable_seq_lengths,
            "pipeline_dtype": torch.float32,
            "moe_token_dispatcher_type": "alltoall",
        }
    )
    assert config.mhc_active


@pytest.mark.parametrize("mtp_num_layers", [None, 1])
def test_overlap_moe_expert_parallel_comm_is_accepted_with_and_without_mtp(mtp_num_layers):
    config = MHCTransformerConfig(
        **{
            **TINY,
            "overlap_moe_expert_parallel_comm": True,
            "num_moe_experts": 4,
            "expert_model_parallel_size": 2,
            "moe_token_dispatcher_type": "alltoall",
            "bf16": True,
            "mtp_num_layers": mtp_num_layers,
        }
    )
    assert config.mhc_active


def test_megatron_features_are_only_restricted_when_mhc_is_active():
    config = MHCTransformerConfig(**{**TINY, "mhc_num_residual_streams": 1, "mtp_num_layers": 1})
    assert not config.mhc_active
