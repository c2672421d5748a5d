"""The mHC layer's nodes for Megatron's combined 1F1B schedule (`overlap_moe_expert_parallel_comm`).

The schedule (megatron.core.pipeline_parallel.combined_1f1b) splits every layer of a model chunk
into nodes and interleaves the forward of one micro-batch with the backward of another, so that
the expert-parallel all-to-alls (on the communication stream) overlap computation. A
HyperConnectionTransformerLayer gives these nodes (`TransformerLayerSchedulePlan.run` order):

- `pre_dispatch_computation` (compute stream): the attention's HC module (mappings, collapse),
  the attention, its HC update; the MLP's HC mappings and collapse; for a MoE layer also the
  pre-MLP norm, router and dispatch preprocess;
- `moe_dispatch`, `moe_combine` (communication stream) and `mlp` (compute stream): Megatron's
  dispatch and experts; the combine node stops after the combine and MoE postprocess. A dense
  layer's `mlp` node is the pre-MLP norm and the MLP;
- `mhc_mlp_update`: the MLP's HC update, the stream mixing that replaces the MLP's
  bias-dropout-add, on the high-priority stream with `mhc_mlp_high_priority_stream`, else on the
  compute stream. It sits in the layer plan's last slot (Megatron's `mtp_post_process`, empty in
  a decoder layer), which the schedule runs after the combine and before the next layer's
  pre-dispatch node in forward, and first in the layer's backward. Like every node it waits for
  the chunk's event before it starts and records it when done, in both directions, so every
  kernel sees what it would see on one stream.

The MLP's mappings (streams, H_post, comb) pass from the pre-dispatch node to the update node
through the layer state, detached, so that their gradients flow back into the pre-dispatch
node's backward. The chunk's first stage expands the embedding output into n streams (the
pre-process node). The update node of a chunk's last layer applies the decoder's final norm on
the last stage, whose forward pre-hook contracts the streams (exactly once: the combine node no
longer applies it, and a dense last layer gets it too), and on another stage hands the next
stage [s, b*n, C], as the block's forward does.

A HybridModel layer holds one sublayer: an attention (or MLA) layer is its pre-dispatch node,
whose output the `mlp` and update nodes pass on; an MLP or MoE layer has no attention half. MTP
layers (a GPT's MTP layer, each layer of a HybridModel's MTP depth) get the same nodes around
their inner HC layers, with the MTP steps of `mtp_schedule_nodes.py`.
"""

import functools

from megatron.core.models.common.model_chunk_schedule_plan import (
    TransformerLayerSchedulePlan,
    TransformerModelChunkSchedulePlan,
)
from megatron.core.models.common.utils import PreProcessNode, TransformerLayerNode
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionLayer,
)
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_mhc.transformer.hyper_connection_stack import expand_streams
from megatron_mhc.transformer.mtp_schedule_nodes import (
    MTPEmbeddingWeight,
    MTPLayerCallables,
    SequentialNodes,
    keep_decoder_streams,
)

MLP_UPDATE_NODE = "mhc_mlp_update"


class StreamsExpandingPreProcessNode(PreProcessNode):
    """Megatron's pre-process node (embedding, rotary embeddings); on the first stage its output
    is expanded into the n-stream state [s, b, n*C].

    On a chunk with MTP layers it also hands them the word-embedding weight, and takes the MTP
    embedding's gradient back into its own backward (`mtp_schedule_nodes.MTPEmbeddingWeight`).
    """

    def forward_impl(self):
        if self.model.mtp_process:
            self.chunk_state.mtp_embedding_weight = MTPEmbeddingWeight(self.model.embedding)
        hidden_states = super().forward_impl()
        if not self.model.pre_process:
            return hidden_states  # the previous stage's state, already [s, b, n*C]
        return expand_streams(hidden_states, self.model.config.mhc_num_residual_streams)

    def default_backward_func(self, outputs, output_grad):
        weight = getattr(self.chunk_state, "mtp_embedding_weight", None)
        if weight is not None:
            self.chunk_state.mtp_embedding_weight = None
            outputs, output_grad = weight.add_to_backward(outputs, output_grad)
        return super().default_backward_func(outputs, output_grad)


class HyperConnectionLayerCallables:
    """The node functions of one HyperConnectionTransformerLayer (`fn(node, *inputs)`), built
    from the layer's own pieces: `_hyper_connected` and `_attention` (attention half),
    the MLP HC module's forward and update, `_forward_pre_mlp_layernorm`, `_mlp` (dense).
    `in_mtp`: the layer is an MTP layer's inner layer (its output is no decoder output)."""

    def __init__(self, layer, in_mtp: bool = False):
        self.layer = layer
        self.in_mtp = in_mtp
        self.is_moe = isinstance(layer.mlp, MoELayer)
        # A HybridModel layer holds one half: attention (or MLA) only, or MLP / MoE only.
        self.has_attention = not isinstance(layer.self_attention, IdentityOp)
        self.has_mlp = not isinstance(layer.mlp, IdentityOp)

    def pre_dispatch(self, node, hidden_states):
        """[s, b, n*C] -> the MLP's input: (tokens, probs) to dispatch, or the collapsed
        input [s, b, C] of a dense MLP."""
        layer, chunk = self.layer, node.chunk_state
        streams = hidden_states.unflatten(-1, (layer.num_streams, -1))
        if self.has_attention:
            streams = layer._hyper_connected(
                layer.self_attention_hyper_connection,
                streams,
                functools.partial(
                    layer._attention,
                    attention_mask=chunk.attention_mask,
                    inference_context=None,
                    rotary_pos_emb=chunk.rotary_pos_emb,
                    rotary_pos_cos=chunk.rotary_pos_cos,
                    rotary_pos_sin=chunk.rotary_pos_sin,
                    rotary_pos_cos_sin=None,
                    attention_bias=chunk.attention_bias,
                    packed_seq_params=chunk.packed_seq_params,
                    sequence_len_offset=chunk.sequence_len_offset,
                ),
            )
        if not self.has_mlp:
            # An attention layer's output, which the MLP and update nodes pass on.
            return streams.flatten(-2)
        hc = layer.mlp_hyper_connection(streams)
        state = node.layer_state
        state.mlp_streams = node.detach(hc.streams)
        state.mlp_h_post = node.detach(hc.h_post)
        state.mlp_comb = node.detach(hc.comb)
        state.mlp_bias = None  # a dense MLP's bias, set by its node
        if not self.is_moe:
            return hc.sublayer_input
        # What MoELayer.forward does before its dispatch.
        normed = layer._forward_pre_mlp_layernorm(hc.sublayer_input)
        shared_expert_output = layer.mlp.shared_experts_compute(normed)
        probs, routing_map = layer.mlp.route(normed, padding_mask=chunk.padding_mask)
        local_tokens, probs = layer.mlp.preprocess(normed, probs, routing_map)
        if shared_expert_output is not None:
            state.shared_expert_output = node.detach(shared_expert_output)
        return local_tokens, probs

    def dense_mlp(self, node, mlp_input):
        """The collapsed input [s, b, C] -> the dense MLP's output (its bias goes to the update
        through the layer state); an attention layer's output passed on."""
        if not self.has_mlp:
            return mlp_input
        output, bias = self.layer._mlp(
            mlp_input,
            padding_mask=node.chunk_state.padding_mask,
            packed_seq_params=node.chunk_state.packed_seq_params,
        )
        node.layer_state.mlp_bias = None if bias is None else node.detach(bias)
        return output

    def moe_combine(self, node, expert_output):
        """Megatron's combine all-to-all and MoE postprocess; the update is the next node's."""
        mlp = self.layer.mlp
        shared_expert_output = getattr(node.layer_state, "shared_expert_output", None)
        output = mlp.postprocess(mlp.combine(expert_output), shared_expert_output)
        if shared_expert_output is not None:
            # Made on the compute stream, read on this (communication) stream.
            shared_expert_output.record_stream(node.stream)
            node.layer_state.shared_expert_output = None
        return output

    def mlp_update(self, node, mlp_output, compute_stream=None):
        """The MLP's output -> the layer's output [s, b, n*C] (X' = H_post y + comb X).

        `compute_stream`: the stream the other nodes compute on, given when this node runs on
        another one (the high-priority stream).
        """
        if not self.has_mlp:
            return self._layer_output(node, mlp_output)
        layer, state = self.layer, node.layer_state
        inputs = [
            tensor
            for tensor in (
                state.mlp_streams,
                mlp_output,
                state.mlp_bias,
                state.mlp_h_post,
                state.mlp_comb,
            )
            if tensor is not None
        ]
        streams = layer.mlp_hyper_connection.update(
            state.mlp_streams,
            (mlp_output, state.mlp_bias),
            state.mlp_h_post,
            state.mlp_comb,
            layer.hidden_dropout,
            use_update_stream=False,
        )
        state.mlp_streams = state.mlp_h_post = state.mlp_comb = state.mlp_bias = None
        if compute_stream is not None:
            # Tell the caching allocator who else uses these memories: the inputs were made on
            # the compute and communication streams and are read here, the output is made here
            # and read by the compute stream.
            for tensor in inputs:
                tensor.record_stream(node.stream)
            streams.record_stream(compute_stream)
        return self._layer_output(node, streams.flatten(-2))

    def _layer_output(self, node, output):
        """The layer's output [s, b, n*C]; after a chunk's last layer, the decoder's output: the
        final norm's (its pre-hook contracts the streams) or the next stage's input."""
        if node.is_last_layer and not self.in_mtp:
            model = node.chunk_state.model
            decoder = model.decoder
            # GPT's TransformerBlock calls it final_layernorm, HybridStack final_norm (absent
            # where the stage does not hold it).
            final_norm = getattr(decoder, "final_layernorm", None) or getattr(
                decoder, "final_norm", None
            )
            if final_norm is not None:
                output = final_norm(output)
                if model.mtp_process:
                    # The streams before the contract, kept by the norm's pre-hook, are the
                    # first MTP depth's input.
                    keep_decoder_streams(node, model.final_streams.pop())
            elif not decoder.post_process:
                return decoder.to_next_stage(output)
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)


class HyperConnectionLayerSchedulePlan(TransformerLayerSchedulePlan):
    """Megatron's layer plan (its nodes, streams, free-input policy and delayed weight-gradient
    map) with the node functions of a HyperConnectionTransformerLayer and the MLP's HC update
    as a node of its own (see the module docstring)."""

    def _build_callable_nodes(self, event, comp_stream, comm_stream, extra_args):
        # An MTP depth's layers: a GPT's MTP layer is one plan around its inner layer; a
        # HybridModel's MTP depth has a stack of inner layers, one plan each (the chunk plan
        # gives them `mtp_layer`), the first entering the depth and the last leaving it.
        if isinstance(self.layer, MultiTokenPredictionLayer):
            mtp_layer, layer = self.layer, self.layer.mtp_model_layer
            enters = leaves = True
        else:
            mtp_layer, layer = extra_args.get("mtp_layer"), self.layer
            enters, leaves = extra_args.get("mtp_enters"), extra_args.get("mtp_leaves")
        # Megatron's nodes of an MTP layer come from its MTP node functions
        # (build_mtp_layer_callables), which take a MoE inner layer and the single-stream MTP
        # only: an mHC MTP layer's nodes are built as its inner layer's, and the MTP steps are
        # the mHC MTP node functions' (mtp_schedule_nodes.py).
        own_layer, self.layer = self.layer, layer
        try:
            super()._build_callable_nodes(event, comp_stream, comm_stream, extra_args)
        finally:
            self.layer = own_layer
        callables = HyperConnectionLayerCallables(layer, in_mtp=mtp_layer is not None)
        self.pre_dispatch_computation.submodule = callables.pre_dispatch
        if callables.is_moe:
            self.moe_combine.submodule = callables.moe_combine
        else:
            self.mlp.submodule = callables.dense_mlp
        update_stream = getattr(layer.mlp_hyper_connection, "update_stream", None)
        update = callables.mlp_update
        if update_stream is not None:
            update_stream = update_stream.stream
            update = functools.partial(update, compute_stream=comp_stream())
        # The update has no delayed weight gradients (HC parameters are not Transformer Engine
        # linears).
        update_node = TransformerLayerNode(
            update_stream or comp_stream,
            event,
            self.layer_state,
            self.chunk_state,
            update,
            name=MLP_UPDATE_NODE,
            extra_args=extra_args,
        )
        # `mtp_post_process` is the slot the schedule runs right after the combine: see the
        # module docstring.
        if mtp_layer is None:
            self.mtp_post_process = update_node
            return
        mtp = MTPLayerCallables(mtp_layer, callables)
        for node in (self.pre_dispatch_computation, self.moe_dispatch, self.mlp, self.moe_combine):
            if isinstance(node, TransformerLayerNode):
                node.submodule = mtp.with_rng_context(node.submodule)
        update_node.submodule = mtp.with_rng_context(update_node.submodule)
        if enters:
            self.pre_dispatch_computation.submodule = mtp.pre_dispatch
            # The delayed weight gradients of the projections, as Megatron's MTP node has those
            # of its eh_proj (Transformer Engine linears only).
            self.pre_dispatch_computation.bwd_dw_callables += [mtp_layer.e_proj, mtp_layer.h_proj]
        if not leaves:
            self.mtp_post_process = update_node
            return
        post_process = TransformerLayerNode(
            comp_stream,
            event,
            self.layer_state,
            self.chunk_state,
            mtp.post_process,
            name="mtp_post_process",
            extra_args=extra_args,
        )
        self.mtp_post_process = SequentialNodes(update_node, post_process)


class MHCModelChunkSchedulePlan(TransformerModelChunkSchedulePlan):
    """Megatron's model-chunk plan for an MHCGPTModel or MHCHybridModel chunk (the pre- and
    post-process nodes call the model's `_preprocess` and `_postprocess`)."""

    LAYER_SCHEDULE_PLAN_CLASS = HyperConnectionLayerSchedulePlan
    PRE_PROCESS_NODE_CLASS = StreamsExpandingPreProcessNode

    def _build_layer_schedule_plan(self, module, comp_stream, comm_stream):
        if not isinstance(module, MultiTokenPredictionBlock) or isinstance(
            module.layers[0].mtp_model_layer, TransformerLayer
        ):
            return super()._build_layer_schedule_plan(module, comp_stream, comm_stream)
        # A HybridModel MTP block: each depth's inner layers are a HybridStack, one plan each.
        for depth, mtp_layer in enumerate(module.layers):
            inner_layers = mtp_layer.mtp_model_layer.layers
            for index, layer in enumerate(inner_layers):
                enters, leaves = index == 0, index == len(inner_layers) - 1
                extra_args = {
                    "is_first_layer": depth == 0 and enters,
                    "is_last_layer": depth == len(module.layers) - 1 and leaves,
                    "mtp_layer": mtp_layer,
                    "mtp_enters": enters,
                    "mtp_leaves": leaves,
                }
                self._transformer_layers.append(
                    self.LAYER_SCHEDULE_PLAN_CLASS(
                        layer, self.event, self.state, comp_stream, comm_stream, extra_args
                    )
                )
