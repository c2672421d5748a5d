"""HyperConnectionTransformerLayer: a Megatron TransformerLayer on an n-stream residual."""

import functools
from typing import Optional

from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import deprecate_inference_params, make_viewless_tensor

from megatron_mhc.transformer.high_priority_stream import mlp_high_priority_stream
from megatron_mhc.transformer.hyper_connection import HyperConnectionModule


class HyperConnectionTransformerLayer(TransformerLayer):
    """A transformer layer whose residual is n streams [s, b, n*C], mixed by two HC modules.

    Megatron's submodules (pre-norms, self-attention, dense MLP or MoE) are built from the same
    spec as the plain layer and compute on the collapsed [s, b, C] input; the HC modules
    `self_attention_hc` and `mlp_hc` replace the two bias-dropout-adds. Megatron's selective
    recompute of the norms and of the dense MLP is honoured as in the plain layer.
    """

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        if not isinstance(self.cross_attention, IdentityOp):
            raise ValueError(
                "HyperConnectionTransformerLayer supports decoder-only layers: the spec's "
                f"cross_attention must be IdentityOp, got {type(self.cross_attention).__name__}"
            )
        self.num_streams = config.mhc_num_residual_streams
        first_hc_index = 2 * (self.layer_number - 1)  # layer_number is global and 1-based
        self.self_attention_hc = HyperConnectionModule(config, first_hc_index)
        self.mlp_hc = HyperConnectionModule(config, first_hc_index + 1,
                                            update_stream=mlp_high_priority_stream(config))

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        *,
        inference_params=None,
    ):
        """[s, b, n*C] -> ([s, b, n*C], context), the signature of TransformerLayer.forward."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        streams = hidden_states.unflatten(-1, (self.num_streams, -1))

        hc = self.self_attention_hc(streams)
        attention_output_with_bias = self.self_attention(
            self._input_layernorm(hc.sublayer_input),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        if self.recompute_input_layernorm:
            self.input_layernorm_checkpoint.discard_output_and_register_recompute(
                attention_output_with_bias[0]
            )
        streams = self.self_attention_hc.update(
            hc.streams, attention_output_with_bias, hc.h_post, hc.comb, self.hidden_dropout
        )

        hc = self.mlp_hc(streams)
        mlp_output_with_bias = self._mlp(hc.sublayer_input, padding_mask, packed_seq_params)
        streams = self.mlp_hc.update(
            hc.streams, mlp_output_with_bias, hc.h_post, hc.comb, self.hidden_dropout
        )

        # The schedules free the output's storage after sending it; it must own that storage.
        output = make_viewless_tensor(
            inp=streams.flatten(-2), requires_grad=streams.requires_grad, keep_graph=True
        )
        return output, context

    def _input_layernorm(self, attention_input: Tensor) -> Tensor:
        if self.recompute_input_layernorm:
            self.input_layernorm_checkpoint = tensor_parallel.CheckpointWithoutOutput()
            return self.input_layernorm_checkpoint.checkpoint(self.input_layernorm, attention_input)
        return self.input_layernorm(attention_input)

    def _mlp(self, mlp_input: Tensor, padding_mask, packed_seq_params):
        """Pre-MLP norm and MLP (dense or MoE) on the collapsed input -> (output, bias)."""
        normed = self._forward_pre_mlp_layernorm(mlp_input)
        normed, padding_mask, moe_unflatten_mbs = self._maybe_unflatten_for_moe(
            normed, padding_mask, packed_seq_params
        )
        if self.recompute_mlp:
            output, bias = tensor_parallel.checkpoint(
                functools.partial(self.mlp, padding_mask=padding_mask), False, normed
            )
        else:
            output, bias = self.mlp(normed, padding_mask=padding_mask)
        output = self._maybe_reflatten_from_moe(output, packed_seq_params, moe_unflatten_mbs)
        if self.recompute_pre_mlp_layernorm:
            self.pre_mlp_norm_checkpoint.discard_output_and_register_recompute(output)
        return output, bias
