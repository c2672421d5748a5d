"""HybridModel stack specs: a local (pure PyTorch) one, and their mHC form.

Megatron ships only Transformer Engine hybrid specs (`hybrid_layer_specs.hybrid_stack_spec`).
`get_local_hybrid_stack_spec` builds each single-sublayer HybridModel layer from Megatron's local
GPT layer submodules, keeping one half of the GPT layer: an attention layer (`*`) is a GPT layer
without its MLP half, an MLP (`-`) or MoE (`E`) layer one without its attention half, so that a
hybrid `*-` pair holds exactly the modules of one GPT layer. Its MTP block (the pattern's part
after `/`) is Megatron's hybrid one with the local norms and linear of Megatron's local GPT MTP
layer; each MTP depth's inner layers are a HybridStack of the same layer specs. Its torch norms,
the stack's final norm and the MTP norms included, are `SequenceParallelTorchNorm`s
(`with_sequence_parallel_norms`, as for the GPT spec), so sequence parallelism runs on it.

`get_mhc_hybrid_stack_spec` turns a hybrid stack spec (local or Transformer Engine) into the mHC
one: a HyperConnectionHybridStack whose TransformerLayer-family layers (attention, MLA, DSA, GDN,
MLP, MoE) get a hyper-connection around their sublayer (`get_mhc_layer_spec`), and whose MTP
layers are MHCMultiTokenPredictionLayers (see multi_token_prediction.py): their inner HybridStack
is built from the same mHC layer specs, so each MTP sublayer has its own HC module.
"""

import dataclasses
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols, parse_hybrid_pattern
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    get_mtp_layer_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.transformer.hybrid_stack import (
    HybridStackWithNormSubmodules,
    HyperConnectionHybridStack,
    SpecNormHybridStack,
)
from megatron_mhc.transformer.latent_attention import with_latent_dot_product_attention
from megatron_mhc.transformer.multi_token_prediction import get_mhc_mtp_block_submodules
from megatron_mhc.transformer.specs import get_mhc_layer_spec, with_sequence_parallel_norms

LOCAL_HYBRID_LAYER_SYMBOLS = (Symbols.ATTENTION, Symbols.MLA, Symbols.MLP, Symbols.MOE)
"""The layer types of the local hybrid spec. Mamba `M` and GDN `G` need CUDA packages (mamba_ssm,
FLA); DSA `D` needs Transformer Engine's linears and fused kernels for its indexer."""

# HybridStackSubmodules slot of each TransformerLayer-family layer type.
_TRANSFORMER_LAYER_SLOTS = (
    "attention_layer",
    "mla_layer",
    "dsa_layer",
    "gdn_layer",
    "mlp_layer",
    "moe_layer",
)


def _attention_half(submodules: TransformerLayerSubmodules) -> TransformerLayerSubmodules:
    """A GPT layer's submodules without the MLP half."""
    return dataclasses.replace(
        submodules,
        pre_mlp_layernorm=IdentityOp,
        mlp=IdentityOp,
        mlp_bda=IdentityFuncOp,
        sharded_state_dict_keys_map={
            k: v
            for k, v in submodules.sharded_state_dict_keys_map.items()
            if k == "input_layernorm."
        },
    )


def _mlp_half(submodules: TransformerLayerSubmodules) -> TransformerLayerSubmodules:
    """A GPT layer's submodules without the attention half."""
    return dataclasses.replace(
        submodules,
        input_layernorm=IdentityOp,
        self_attention=IdentityOp,
        self_attn_bda=IdentityFuncOp,
        sharded_state_dict_keys_map={
            k: v
            for k, v in submodules.sharded_state_dict_keys_map.items()
            if k == "pre_mlp_layernorm."
        },
    )


def get_local_hybrid_stack_spec(config: MHCTransformerConfig) -> ModuleSpec:
    """A HybridStack spec of Megatron-Core's local modules for `*`, `+`, `-` and `E` layers (the
    MLA layers' core attention a LatentDotProductAttention, which Megatron lacks); its final norm
    is the layers' norm, as in Megatron's local GPT block spec; its MTP block spec has Megatron's
    local MTP layer without an inner layer (HybridModel builds each depth's inner
    HybridStack from the pattern's MTP part), as Megatron's Transformer Engine hybrid spec."""
    local = dict(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    dense = get_gpt_layer_local_submodules(**local)
    latent = get_gpt_layer_local_submodules(multi_latent_attention=True, **local)
    layer = dict(module=TransformerLayer)
    moe_layer = IdentityOp
    if config.num_moe_experts is not None:
        moe = get_gpt_layer_local_submodules(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm, **local
        )
        moe_layer = ModuleSpec(**layer, submodules=_mlp_half(moe))
    return with_latent_dot_product_attention(
        with_sequence_parallel_norms(
            ModuleSpec(
                module=SpecNormHybridStack,
                submodules=HybridStackWithNormSubmodules(
                    attention_layer=ModuleSpec(**layer, submodules=_attention_half(dense)),
                    mla_layer=ModuleSpec(**layer, submodules=_attention_half(latent)),
                    mlp_layer=ModuleSpec(**layer, submodules=_mlp_half(dense)),
                    moe_layer=moe_layer,
                    final_norm=dense.input_layernorm,
                    mtp_block_spec=ModuleSpec(
                        module=MultiTokenPredictionBlock,
                        submodules=MultiTokenPredictionBlockSubmodules(
                            layer_specs=[
                                get_mtp_layer_spec(
                                    mtp_model_layer_spec=None, use_transformer_engine=False
                                )
                            ]
                        ),
                    ),
                ),
            )
        )
    )


def get_te_hybrid_stack_spec() -> ModuleSpec:
    """Megatron's Transformer Engine hybrid stack spec, its final norm in the spec."""
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    submodules = hybrid_stack_spec.submodules
    fields = {f.name: getattr(submodules, f.name) for f in dataclasses.fields(submodules)}
    return ModuleSpec(
        module=SpecNormHybridStack,
        submodules=HybridStackWithNormSubmodules(**fields, final_norm=TENorm),
    )


def get_mhc_hybrid_stack_spec(stack_spec: ModuleSpec) -> ModuleSpec:
    """The same stack on n streams: every TransformerLayer-family layer spec made an HC layer
    (`get_mhc_layer_spec`) and the MTP layers the mHC ones; the Mamba slot is left as it is
    (`check_hybrid_layer_pattern` refuses `M` with mHC)."""
    submodules = stack_spec.submodules
    mhc_layers = {
        slot: get_mhc_layer_spec(getattr(submodules, slot))
        for slot in _TRANSFORMER_LAYER_SLOTS
        if isinstance(getattr(submodules, slot), ModuleSpec)
    }
    mtp_block_spec = submodules.mtp_block_spec
    if mtp_block_spec is not None:
        # HybridModel constructs its MTP block class itself (MHCHybridModel makes it the mHC
        # one); the spec gives the layers.
        mhc_layers["mtp_block_spec"] = dataclasses.replace(
            mtp_block_spec, submodules=get_mhc_mtp_block_submodules(mtp_block_spec.submodules)
        )
    return ModuleSpec(
        module=HyperConnectionHybridStack,
        params=dict(stack_spec.params),
        submodules=dataclasses.replace(submodules, **mhc_layers),
    )


def get_hybrid_stack_spec(config: MHCTransformerConfig) -> ModuleSpec:
    """The hybrid stack spec for `config.transformer_impl` ('local' or 'transformer_engine'),
    made mHC when mHC is active."""
    if config.transformer_impl == "transformer_engine":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                "installed: install megatron-mhc[te] or set transformer_impl='local'"
            )
        spec = get_te_hybrid_stack_spec()
    else:
        spec = get_local_hybrid_stack_spec(config)
    return get_mhc_hybrid_stack_spec(spec) if config.mhc_active else spec


LAYER_TYPE_NAMES = {
    Symbols.ATTENTION: "attention",
    Symbols.MLA: "multi-latent attention",
    Symbols.MLP: "MLP",
    Symbols.MOE: "MoE",
    Symbols.DS_ATTENTION: "DeepSeek sparse attention",
    Symbols.MAMBA: "Mamba",
    Symbols.GDN: "gated delta net",
}


def _layer_types(symbols) -> str:
    return ", ".join(f"'{s}' {LAYER_TYPE_NAMES[s]}" for s in symbols)


def check_hybrid_layer_symbols(hybrid_layer_pattern: str, transformer_impl: str) -> None:
    """ValueError naming --hybrid-layer-pattern when the pattern has a symbol that is no layer
    type, or a layer type the spec of `transformer_impl` cannot build, saying what it builds.
    Needs only the flags as given: the launch runs it before Megatron's validation parses the
    pattern (whose error names no flag and lists every symbol, buildable here or not)."""
    local = transformer_impl != "transformer_engine"
    buildable = LOCAL_HYBRID_LAYER_SYMBOLS if local else tuple(LAYER_TYPE_NAMES)
    spec = f"the {'local' if local else 'Transformer Engine'} spec (--transformer-impl "
    spec += f"{transformer_impl}) builds {_layer_types(buildable)}; '|' separates pipeline "
    spec += "stages, '/' starts the MTP layers"

    def refuse(why: str):
        raise ValueError(f"--hybrid-layer-pattern {hybrid_layer_pattern!r}: {why}")

    if not hybrid_layer_pattern:
        refuse(f"it must describe at least one layer: {spec}")
    separators = {Symbols.PIPE, Symbols.MTP_SEPARATOR}
    unknown = sorted(set(hybrid_layer_pattern) - Symbols.VALID_LAYERS - separators)
    if unknown:
        refuse(f"{', '.join(map(repr, unknown))}: no layer type has that symbol; {spec}")
    unsupported = sorted(set(hybrid_layer_pattern) - set(buildable) - separators)
    if unsupported:
        refuse(
            f"layer types {_layer_types(unsupported)} need --transformer-impl "
            f"transformer_engine and their CUDA packages; {spec}"
        )
    try:
        parse_hybrid_pattern(hybrid_layer_pattern)
    except ValueError as err:
        refuse(str(err))


def check_hybrid_layer_pattern(config: MHCTransformerConfig, hybrid_layer_pattern: str) -> None:
    """ValueError naming `hybrid_layer_pattern` (or the config field) when the model it
    describes cannot be built with `config`."""
    check_hybrid_layer_symbols(hybrid_layer_pattern, config.transformer_impl)

    def refuse(why: str):
        raise ValueError(f"hybrid_layer_pattern={hybrid_layer_pattern!r} is invalid: {why}")

    parsed = parse_hybrid_pattern(hybrid_layer_pattern)
    # The MTP part's layers are built from the same stack spec as the main part's.
    symbols = set((parsed.main_pattern or "") + (parsed.mtp_pattern or "")) - {Symbols.PIPE}
    latent = sorted(symbols & {Symbols.MLA, Symbols.DS_ATTENTION})
    if latent and not isinstance(config, MLATransformerConfig):
        refuse(
            f"layer types {latent} (multi-latent attention) need an MLATransformerConfig "
            "(MHCMLATransformerConfig, which megatron_mhc builds for --multi-latent-attention "
            f"or a pattern with them), not {type(config).__name__}"
        )
    mtp_depths = parsed.mtp_num_depths if parsed.mtp_pattern is not None else 0
    if (config.mtp_num_layers or 0) != mtp_depths:
        # HybridModel builds the MTP block from the pattern and runs config.mtp_num_layers
        # depths of it; megatron.training sets the field from the pattern.
        raise ValueError(
            f"MHCTransformerConfig.mtp_num_layers={config.mtp_num_layers} is invalid with "
            f"hybrid_layer_pattern={hybrid_layer_pattern!r}: a HybridModel's MTP depths are the "
            f"pattern's parts after '/' ({mtp_depths} here), and mtp_num_layers must equal "
            "their number (None or 0 without a '/' part)"
        )
    if config.mhc_active and Symbols.MAMBA in symbols:
        refuse(
            "Mamba layers ('M') are not supported with mHC (enable_mhc_connections and "
            "mhc_num_residual_streams > 1): MambaLayer adds its own single-stream residual"
        )
    if Symbols.MOE in symbols and config.num_moe_experts is None:
        raise ValueError(
            f"MHCTransformerConfig.num_moe_experts=None is invalid: hybrid_layer_pattern="
            f"{hybrid_layer_pattern!r} has MoE layers ('E'), which need a number of experts"
        )
