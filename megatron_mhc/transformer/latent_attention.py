"""Megatron's local core attention for multi-latent attention (MLA), which Megatron's local spec
cannot build.

MLASelfAttention builds its core attention with `k_channels` (qk_head_dim + qk_pos_emb_head_dim)
and `v_channels` (v_head_dim); only TEDotProductAttention takes them, so Megatron's local GPT spec
with `multi_latent_attention=True` fails to build. `LatentDotProductAttention` is Megatron's local
DotProductAttention taking both: its scores and softmax are sized from the query and key, and
MLASelfAttention gives the softmax scale, so only the width of the flattened context, which
DotProductAttention derives from kv_channels, has to come from `v_channels` instead.
"""

import dataclasses
import math

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import divide


class LatentDotProductAttention(DotProductAttention):
    """DotProductAttention with key heads of `k_channels` and value heads of `v_channels`."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        **kwargs,
    ):
        if softmax_scale is None and k_channels is not None:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            **kwargs,
        )
        if v_channels is not None:
            self.hidden_size_per_partition = divide(
                v_channels * config.num_attention_heads, self.pg_collection.tp.size()
            )


def with_latent_dot_product_attention(spec):
    """`spec` (a block, layer or submodule spec, or a list of them) with the core attention of
    every MLASelfAttention that is Megatron's local DotProductAttention made a
    LatentDotProductAttention; other specs are returned unchanged."""
    if isinstance(spec, list):
        return [with_latent_dot_product_attention(item) for item in spec]
    if isinstance(spec, ModuleSpec) and spec.module is MLASelfAttention:
        if spec.submodules.core_attention is DotProductAttention:
            return dataclasses.replace(
                spec,
                submodules=dataclasses.replace(
                    spec.submodules, core_attention=LatentDotProductAttention
                ),
            )
        return spec
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(
            spec,
            **{
                f.name: with_latent_dot_product_attention(getattr(spec, f.name))
                for f in dataclasses.fields(spec)
                if f.init
            },
        )
    return spec
