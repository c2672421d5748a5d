"""Upcycling: a trained baseline (GPT or HybridModel) state dict made the state dict of the same
model with mHC, computing the same function (identity init)."""

import re
from collections.abc import Mapping

import torch

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.transformer.hyper_connection import HyperConnectionHead, HyperConnectionModule

_LAYER_KEY = re.compile(r"^(.*decoder\.layers\.\d+)\.")
_FINAL_NORM_KEY = re.compile(r"^(.*decoder)\.(?:final_layernorm|final_norm)\.")
# The hyper-connection slot of each residual sublayer, by the sublayer's module name.
_SUBLAYER_HYPER_CONNECTIONS = {
    "self_attention": "self_attention_hyper_connection",
    "mlp": "mlp_hyper_connection",
}
_HC_ENTRY = re.compile(r"\.(?:self_attention_hyper_connection|mlp_hyper_connection|mhc_head)\.")


def upcycle_state_dict(
    baseline_state_dict: Mapping[str, torch.Tensor], config: MHCTransformerConfig
) -> dict:
    """A baseline (non-mHC) state dict turned into the state dict of the mHC model.

    Every baseline entry is kept under its name; each residual sublayer (a layer's
    `self_attention` or `mlp`, dense or MoE) gains its hyper-connection and, with the learned
    contract, the decoder holding the final norm gains the head, all with the identity init, so
    the mHC model computes the baseline's function. Works on a whole model's or one pipeline
    stage's state dict, of a GPTModel or a HybridModel (layers and sublayers are taken from the
    keys). `config.mhc_init` must be 'identity'.
    """
    if not config.mhc_active or config.mhc_init != "identity":
        raise ValueError(
            "upcycle_state_dict needs mHC active and mhc_init='identity' (got "
            f"enable_mhc_connections={config.enable_mhc_connections}, mhc_num_residual_streams="
            f"{config.mhc_num_residual_streams}, mhc_init={config.mhc_init!r})"
        )
    hc_state = HyperConnectionModule(config, hc_index=0).state_dict()
    upcycled = dict(baseline_state_dict)
    layer_prefixes = {m.group(1) for key in baseline_state_dict if (m := _LAYER_KEY.match(key))}
    for prefix in sorted(layer_prefixes):
        for sublayer, slot in _SUBLAYER_HYPER_CONNECTIONS.items():
            if any(key.startswith(f"{prefix}.{sublayer}.") for key in baseline_state_dict):
                for name, value in hc_state.items():
                    upcycled[f"{prefix}.{slot}.{name}"] = value.clone()
    if config.mhc_output_contract == "learned":
        head_state = HyperConnectionHead(config).state_dict()
        decoders = {m.group(1) for key in baseline_state_dict if (m := _FINAL_NORM_KEY.match(key))}
        for prefix in decoders:
            for name, value in head_state.items():
                upcycled[f"{prefix}.mhc_head.{name}"] = value.clone()
    return upcycled


def check_upcycled_names(
    baseline_state_dict: Mapping[str, torch.Tensor], mhc_state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Raise ValueError unless the names map one to one: every baseline entry is in the mHC
    state dict with the same shape, and every other mHC entry is an HC parameter."""
    missing = sorted(set(baseline_state_dict) - set(mhc_state_dict))
    reshaped = sorted(
        key
        for key in set(baseline_state_dict) & set(mhc_state_dict)
        if isinstance(baseline_state_dict[key], torch.Tensor)
        and baseline_state_dict[key].shape != mhc_state_dict[key].shape
    )
    unexpected = sorted(
        key for key in set(mhc_state_dict) - set(baseline_state_dict) if not _HC_ENTRY.search(key)
    )
    if missing or reshaped or unexpected:
        raise ValueError(
            "baseline and mHC state dicts do not map one to one: "
            f"missing from mHC: {missing}; shape changed: {reshaped}; "
            f"unexpected non-HC entries: {unexpected}"
        )
