"""mHC layer and block specs, built on Megatron's local or Transformer Engine GPT specs."""

import dataclasses
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.transformer.hyper_connection import HyperConnectionModule
from megatron_mhc.transformer.latent_attention import with_latent_dot_product_attention
from megatron_mhc.transformer.torch_norm import SequenceParallelTorchNorm
from megatron_mhc.transformer.transformer_layer import (
    HyperConnectionTransformerLayer,
    HyperConnectionTransformerLayerSubmodules,
)


def get_mhc_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """The same layer (same submodules: norms, attention, dense MLP or MoE) on n streams, with
    a hyper-connection around each sublayer the layer has."""
    submodules = layer_spec.submodules
    fields = {f.name: getattr(submodules, f.name) for f in dataclasses.fields(submodules)}
    return ModuleSpec(
        module=HyperConnectionTransformerLayer,
        params=dict(layer_spec.params),
        submodules=HyperConnectionTransformerLayerSubmodules(
            **fields,
            self_attention_hyper_connection=(
                IdentityOp if submodules.self_attention is IdentityOp else HyperConnectionModule
            ),
            mlp_hyper_connection=IdentityOp
            if submodules.mlp is IdentityOp
            else HyperConnectionModule,
        ),
    )


def with_sequence_parallel_norms(spec):
    """`spec` (a block, layer or submodule spec, or a list of them) with every Megatron torch norm
    (`WrappedTorchNorm`, the local spec's norm without apex) made a `SequenceParallelTorchNorm`.

    Identical without sequence parallelism; with it, the local spec runs instead of asserting.
    """
    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, list):
        return [with_sequence_parallel_norms(item) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(
            spec,
            **{
                f.name: with_sequence_parallel_norms(getattr(spec, f.name))
                for f in dataclasses.fields(spec)
                if f.init
            },
        )
    return spec


def get_mhc_gpt_decoder_block_spec(
    config: MHCTransformerConfig,
    normalization: str | None = None,
    qk_l2_norm: bool = False,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Megatron's GPT decoder block spec with every layer made an mHC layer.

    The backend follows `config.transformer_impl` ('local' or 'transformer_engine'); Transformer
    Engine is imported only when asked for; `normalization` defaults to `config.normalization`.
    The local spec's torch norms are `SequenceParallelTorchNorm`s (the same norms, usable with
    sequence parallelism) and its MLA core attention a `LatentDotProductAttention` (which Megatron's
    local spec lacks). Without mHC (disabled, or one stream) this is Megatron's spec otherwise
    unchanged.
    """
    use_te = config.transformer_impl == "transformer_engine"
    if use_te and importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(
            "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
            "installed: install megatron-mhc[te] or set transformer_impl='local'"
        )
    block_spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=normalization or config.normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    if not use_te:
        block_spec = with_latent_dot_product_attention(with_sequence_parallel_norms(block_spec))
    if not config.mhc_active:
        return block_spec
    return TransformerBlockSubmodules(
        layer_specs=[get_mhc_layer_spec(spec) for spec in block_spec.layer_specs],
        layer_norm=block_spec.layer_norm,
    )
