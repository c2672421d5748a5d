"""The mHC MTP layer's nodes for Megatron's combined 1F1B schedule
(`overlap_moe_expert_parallel_comm` with `mtp_num_layers`).

Megatron's schedule plan builds every MTP layer of the chunk as a layer plan after the decoder's
layers, with the nodes of its inner transformer layer and two MTP steps: the pre-dispatch node
first embeds the rolled tokens and combines them with the previous depth's state, and the
`mtp_post_process` node, after the combine, normalises the depth's output and collects the loss
inputs, which the chunk's post-process node hands to Megatron's `process_mtp_loss`. With mHC
(docs/multi_token_prediction.md) the state the MTP reads is the decoder's n streams before the
contract, and the depth's loss input is `final_layernorm(mhc_head(X))`:

- the decoder's last-layer update node keeps its streams, before the final norm contracts
  them, in the chunk state, detached (`keep_decoder_streams`): their gradient from the MTP
  layer comes back in that node's backward, as for every tensor passed between nodes;
- `pre_dispatch`: on the first MTP depth, keeps the decoder output (the node's input, the main
  loss input) as the first of the loss inputs and takes the kept streams; rolls and embeds the
  tokens, `Z_i = e_proj(enorm(e)) + h_proj(hnorm(X_i))` (the layer's own steps), then the inner
  HC layer's pre-dispatch node function on Z;
- dispatch, experts, combine and the MLP's HC update: the inner layer's node functions;
- `post_process`: appends `final_layernorm(mhc_head(X))` to the loss inputs and, on the last
  depth, hands their concatenation [(1 + D) s, b, C] on, as Megatron's MTP node does.

The MLP's HC update node and the MTP post-process node are two nodes, each with its own stream
and name, run one after the other in the layer plan's last slot (`SequentialNodes`). A
HybridModel's MTP depth holds a stack of inner layers, one layer plan each: the first enters the
depth (`pre_dispatch`), the last leaves it (`post_process`).
"""

from contextlib import nullcontext

import torch
from megatron.core import tensor_parallel

EMBEDDING_WEIGHT = "word_embeddings.weight"


class MTPEmbeddingWeight:
    """The word-embedding weight as the MTP layers' embedding reads it under the schedule plan.

    In one forward-backward, autograd adds the embedding weight's gradients from the decoder's
    embedding and from the MTP's in bf16 before they reach the gradient buffer. Under the
    schedule the MTP embedding runs in the MTP layer's node, whose backward is a run of its own:
    its gradient would reach the fp32 buffer apart and round differently. So the chunk's
    pre-process node makes this alias of the weight; the MTP embedding reads a detached copy
    (`embedding`), whose gradient the pre-process node's backward passes through the alias, in
    the same run as the decoder embedding's gradient: the same sum as without the schedule.
    """

    def __init__(self, embedding: torch.nn.Module):
        self.module = embedding
        self.alias = embedding.get_parameter(EMBEDDING_WEIGHT).view_as(
            embedding.get_parameter(EMBEDDING_WEIGHT)
        )
        self.detached = self.alias.detach().requires_grad_()

    def embedding(self, **inputs):
        """The embedding module's forward with the detached weight."""
        return torch.func.functional_call(
            self.module, {EMBEDDING_WEIGHT: self.detached}, (), inputs
        )

    def add_to_backward(self, outputs: tuple, output_grad: tuple) -> tuple:
        """(outputs, their gradients) of the pre-process node's backward, with the alias and the
        MTP embedding's gradient added."""
        if self.detached.grad is None:
            return outputs, output_grad
        return (*outputs, self.alias), (*output_grad, self.detached.grad)


class MTPLayerCallables:
    """The node functions of one MHCMultiTokenPredictionLayer (`fn(node, *inputs)`), around
    those of its inner HC layer (`inner`, a HyperConnectionLayerCallables)."""

    def __init__(self, layer, inner):
        self.layer = layer
        self.inner = inner

    def _rng_context(self):
        # As MultiTokenPredictionLayer's forward: the tensor-parallel RNG under sequence
        # parallelism.
        if self.layer.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return nullcontext()

    def pre_dispatch(self, node, hidden_states):
        """The previous depth's output (on the first depth, the decoder output [s, b, C]) ->
        the inner layer's MLP input, as its pre-dispatch function gives it."""
        layer, chunk = self.layer, node.chunk_state
        if node.is_first_layer:
            chunk.mtp_hidden_states = [hidden_states]
            streams, chunk.mhc_decoder_streams = chunk.mhc_decoder_streams, None
        else:
            streams = hidden_states
        if layer.config.mtp_detach_heads:
            streams = streams.detach()
        input_ids, position_ids, padding_mask, decoder_input, streams = layer._get_embeddings(
            input_ids=chunk.input_ids,
            position_ids=chunk.position_ids,
            embedding=chunk.mtp_embedding_weight.embedding,
            hidden_states=streams,
            packed_seq_params=chunk.packed_seq_params,
            padding_mask=chunk.padding_mask,
        )
        chunk.input_ids, chunk.position_ids, chunk.padding_mask = (
            input_ids,
            position_ids,
            padding_mask,
        )
        with self._rng_context():
            combined = layer._concat_embeddings(streams, decoder_input)
            return self.inner.pre_dispatch(node, combined)

    def with_rng_context(self, function):
        """`function` (a node function) run in the MTP layer's RNG context."""

        def run(node, *inputs):
            with self._rng_context():
                return function(node, *inputs)

        return run

    def post_process(self, node, streams):
        """The depth's streams [s, b, n*C] -> on the last depth the loss inputs of the decoder
        and every depth [(1 + D) s, b, C], else the streams, for the next depth."""
        chunk = node.chunk_state
        chunk.mtp_hidden_states.append(self.layer.head_output(streams))
        if not node.is_last_layer:
            return streams
        loss_inputs = torch.cat(chunk.mtp_hidden_states, dim=0)
        chunk.mtp_hidden_states = None
        return loss_inputs


def keep_decoder_streams(node, streams) -> None:
    """Called by the decoder's last-layer update node of a chunk that holds the MTP block: keep
    the streams [s, b, n*C] entering the contract for the first MTP depth's pre-dispatch node."""
    node.chunk_state.mhc_decoder_streams = node.detach(streams)


class SequentialNodes:
    """Schedule nodes that share one slot of a layer plan: forward runs them in order, each
    on its own stream and with its own name, backward in reverse order."""

    def __init__(self, *nodes):
        self.nodes = nodes

    def forward(self, inputs):
        for node in self.nodes:
            inputs = node.forward(inputs)
        return inputs

    def backward(self, output_grad):
        for node in reversed(self.nodes):
            output_grad = node.backward(output_grad)
        return output_grad
