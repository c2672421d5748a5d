"""HyperConnectionTransformerLayer: a Megatron TransformerLayer on an n-stream residual."""

import functools
from dataclasses import dataclass

from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import deprecate_inference_params, make_viewless_tensor
from torch import Tensor

from megatron_mhc.transformer.high_priority_stream import mlp_high_priority_stream


@dataclass
class HyperConnectionTransformerLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus one hyper-connection slot per residual sublayer.

    The slot names are Megatron-LM's (main, 0.20-dev) native mHC ones. A slot is IdentityOp
    when its sublayer is absent: a HybridModel layer holds one sublayer (attention, MLA, MLP or
    MoE), a GPT layer two.
    """

    self_attention_hyper_connection: ModuleSpec | type = IdentityOp
    mlp_hyper_connection: ModuleSpec | type = IdentityOp


class HyperConnectionTransformerLayer(TransformerLayer):
    """A transformer layer whose residual is n streams [s, b, n*C].

    Megatron's submodules (pre-norms, self-attention, dense MLP or MoE) are built from the same
    spec as the plain layer and compute on the collapsed [s, b, C] input; the hyper-connection
    modules `self_attention_hyper_connection` and `mlp_hyper_connection` (built from the spec's
    slots) replace the two bias-dropout-adds. Either half may be absent (IdentityOp), as in the
    single-sublayer layers of a HybridModel. Megatron's selective recompute of the norms and of
    the dense MLP is honoured as in the plain layer.

    HC modules are numbered in model order (`hc_index`): layer l (1-based, global) with k
    sublayers holds modules k*(l-1) .. k*(l-1)+k-1, so a hybrid `*-` pair and a GPT layer number
    theirs alike.
    """

    def __init__(
        self,
        config,
        submodules: HyperConnectionTransformerLayerSubmodules,
        layer_number: int = 1,
        **kwargs,
    ):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        if not isinstance(self.cross_attention, IdentityOp):
            raise ValueError(
                "HyperConnectionTransformerLayer supports decoder-only layers: the spec's "
                f"cross_attention must be IdentityOp, got {type(self.cross_attention).__name__}"
            )
        self.num_streams = config.mhc_num_residual_streams
        has_attention = not isinstance(self.self_attention, IdentityOp)
        has_mlp = not isinstance(self.mlp, IdentityOp)
        for sublayer, present, slot in (
            ("self_attention", has_attention, submodules.self_attention_hyper_connection),
            ("mlp", has_mlp, submodules.mlp_hyper_connection),
        ):
            if present == (slot is IdentityOp):
                raise ValueError(
                    f"HyperConnectionTransformerLayer: the spec's {sublayer}_hyper_connection "
                    f"must be {'a hyper-connection module' if present else 'IdentityOp'} when "
                    f"{sublayer} is {'present' if present else 'IdentityOp'}"
                )
        first_hc_index = (has_attention + has_mlp) * (self.layer_number - 1)
        self.self_attention_hyper_connection = build_module(
            submodules.self_attention_hyper_connection, config=config, hc_index=first_hc_index
        )
        self.mlp_hyper_connection = build_module(
            submodules.mlp_hyper_connection,
            config=config,
            hc_index=first_hc_index + has_attention,
            update_stream=mlp_high_priority_stream(config),
        )

    @property
    def hyper_connections(self) -> list:
        """This layer's HC modules in forward order."""
        return [
            hc
            for hc in (self.self_attention_hyper_connection, self.mlp_hyper_connection)
            if not isinstance(hc, IdentityOp)
        ]

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        rotary_pos_cos: Tensor | None = None,
        rotary_pos_sin: Tensor | None = None,
        rotary_pos_cos_sin: Tensor | None = None,
        attention_bias: Tensor | None = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        inference_params=None,
    ):
        """[s, b, n*C] -> ([s, b, n*C], context), the signature of TransformerLayer.forward."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        streams = hidden_states.unflatten(-1, (self.num_streams, -1))

        if not isinstance(self.self_attention_hyper_connection, IdentityOp):
            streams = self._hyper_connected(
                self.self_attention_hyper_connection,
                streams,
                functools.partial(
                    self._attention,
                    attention_mask=attention_mask,
                    inference_context=inference_context,
                    rotary_pos_emb=rotary_pos_emb,
                    rotary_pos_cos=rotary_pos_cos,
                    rotary_pos_sin=rotary_pos_sin,
                    rotary_pos_cos_sin=rotary_pos_cos_sin,
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                    sequence_len_offset=sequence_len_offset,
                ),
            )
        if not isinstance(self.mlp_hyper_connection, IdentityOp):
            streams = self._hyper_connected(
                self.mlp_hyper_connection,
                streams,
                functools.partial(
                    self._mlp, padding_mask=padding_mask, packed_seq_params=packed_seq_params
                ),
            )

        # The schedules free the output's storage after sending it; it must own that storage.
        output = make_viewless_tensor(
            inp=streams.flatten(-2), requires_grad=streams.requires_grad, keep_graph=True
        )
        return output, context

    def init_backward_dw_wrapper(self):
        """Megatron's delayed weight gradients of the attention half (`delay_wgrad_compute`
        under the EP overlap); a HybridModel MLP or MoE layer has no attention and delays none
        (build_mhc_hybrid_model refuses `delay_wgrad_compute` under the overlap)."""
        if isinstance(self.self_attention, IdentityOp):
            self.backward_dw_wrapper = None
            return
        super().init_backward_dw_wrapper()

    def _hyper_connected(self, hyper_connection, streams: Tensor, sublayer) -> Tensor:
        """X' = H_post * F(H_pre X) + H_res X: mappings and collapse, the sublayer, update."""
        hc = hyper_connection(streams)
        output_with_bias = sublayer(hc.sublayer_input)
        return hyper_connection.update(
            hc.streams, output_with_bias, hc.h_post, hc.comb, self.hidden_dropout
        )

    def _attention(self, attention_input: Tensor, **attention_kwargs):
        """Input norm and self-attention on the collapsed input -> (output, bias)."""
        if self.recompute_input_layernorm:
            self.input_layernorm_checkpoint = tensor_parallel.CheckpointWithoutOutput()
            normed = self.input_layernorm_checkpoint.checkpoint(
                self.input_layernorm, attention_input
            )
        else:
            normed = self.input_layernorm(attention_input)
        output_with_bias = self.self_attention(normed, **attention_kwargs)
        if self.recompute_input_layernorm:
            self.input_layernorm_checkpoint.discard_output_and_register_recompute(
                output_with_bias[0]
            )
        return output_with_bias

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
