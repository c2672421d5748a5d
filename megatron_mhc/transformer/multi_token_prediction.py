"""Multi-token prediction (MTP) on the n-stream residual, as DeepSeek-V4 builds it.

Megatron's MTP layer k combines the embedding of the tokens k ahead with the previous depth's
hidden state, `eh_proj(cat[enorm(emb), hnorm(h)])`, runs one transformer layer on it and
normalises the result for the shared output layer. With mHC the hidden state is the n-stream
state, and DeepSeek-V4 (and Megatron-LM's dev branch) keep it so through the MTP block:

    X^0        the decoder's stream state entering its contract (before the final norm)
    e          = enorm(embedding(tokens rolled k ahead))                      [s, b, C]
    Z_i        = e_proj(e) + h_proj(hnorm(X^{k-1}_i))   for every stream i     [s, b, n, C]
    X^k        = the decoder's last layer (its attention and MLP HC modules) on Z; in a
                 HybridModel, the layers of the pattern's MTP part (each with its HC module)
    loss input = final_layernorm(mhc_head(X^k))         (the layer's own learned head)

so depth k+1 reads the n streams of depth k, not a contraction of them. `e_proj` and `h_proj`
are `eh_proj` split in its two input halves (`eh_proj(cat[e, h]) = e_proj(e) + h_proj(h)`): the
embedding is projected once and broadcast over the streams instead of n times, and the names
are those of DeepSeek-V4's checkpoints and Megatron-LM's dev branch. The head is a
HyperConnectionHead of its own, whatever `mhc_output_contract` the decoder uses: DeepSeek-V4's MTP
block always has one (`hc_head_fn/base/scale`), and the MTP layer's streams have been mixed
by its own HC modules, so the decoder's contract weights do not apply to them.

The MTP block runs on the last pipeline stage, which also holds the decoder's final norm; the
model (MHCGPTModel, MHCHybridModel) hands it that norm's input (`FinalStreamsCapture`).
Megatron's `process_mtp_loss`, `MTPLossAutoScaler` and `MTPLossLoggingHelper` then compute, scale
and log the MTP loss unchanged. Without mHC the model uses Megatron's own MTP spec (for a
HybridModel, the hybrid stack spec's).
"""

from dataclasses import dataclass, replace

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.transformer.hyper_connection import HyperConnectionHead
from megatron_mhc.transformer.specs import with_sequence_parallel_norms


@dataclass
class MHCMultiTokenPredictionLayerSubmodules(MultiTokenPredictionLayerSubmodules):
    """Megatron's MTP layer submodules with `eh_proj` split into `e_proj` (the embedding) and
    `h_proj` (each stream), and the layer's learned head `mhc_head`; `eh_proj` is IdentityOp."""

    e_proj: ModuleSpec | type = None
    h_proj: ModuleSpec | type = None
    mhc_head: ModuleSpec | type = HyperConnectionHead


class MHCMultiTokenPredictionLayer(MultiTokenPredictionLayer):
    """One MTP depth on the n-stream state (module docstring).

    Megatron's layer with the input combination and the output changed: forward takes and
    returns the stream state [s, b, n*C], so that the next depth reads the streams;
    `head_output` contracts and normalises them into the [s, b, C] input of the shared output
    layer. Rolling, embedding, recompute and checkpoint naming are Megatron's.
    """

    def __init__(
        self,
        config: MHCTransformerConfig,
        submodules: MHCMultiTokenPredictionLayerSubmodules,
        *args,
        **kwargs,
    ):
        super().__init__(config, submodules, *args, **kwargs)
        self.num_streams = config.mhc_num_residual_streams
        pg_collection = kwargs.get("pg_collection")
        name = kwargs.get("name")
        for proj in ("e_proj", "h_proj"):
            setattr(
                self,
                proj,
                build_module(
                    getattr(submodules, proj),
                    config.hidden_size,
                    config.hidden_size,
                    config=config,
                    init_method=config.init_method,
                    gather_output=False,
                    bias=False,
                    skip_bias_add=False,
                    is_expert=False,
                    tp_comm_buffer_name=f"mtp_{proj}",
                    tp_group=pg_collection.tp if pg_collection is not None else None,
                    name=f"{name}.{proj}" if name is not None else None,
                ),
            )
        self.mhc_head = build_module(submodules.mhc_head, config)

    def _concat_embeddings(self, hidden_states: Tensor, decoder_input: Tensor) -> Tensor:
        """Z_i = e_proj(enorm(emb)) + h_proj(hnorm(X_i)) for every stream: [s, b, n*C]."""
        embedding = make_viewless_tensor(
            inp=self.enorm(decoder_input), requires_grad=True, keep_graph=True
        )
        streams = self.hnorm(hidden_states.unflatten(-1, (self.num_streams, -1)))
        # [s, b, n, C] as [s, b*n, C]: the linears (and a sequence-parallel gather along s) take
        # 3-D activations.
        projected_streams, _ = self.h_proj(streams.flatten(1, 2))
        projected_embedding, _ = self.e_proj(embedding)
        combined = projected_streams.unflatten(1, (-1, self.num_streams)) + (
            projected_embedding.unsqueeze(2)
        )
        # Both projections are column-parallel with the same partition of C: add, then gather.
        combined = gather_from_tensor_model_parallel_region(
            combined.flatten(1, 2), group=self.tp_group
        ).view(*combined.shape[:2], -1)
        if self.sequence_parallel:
            combined = scatter_to_sequence_parallel_region(combined, group=self.tp_group)
        return combined

    def _postprocess(self, hidden_states: Tensor) -> Tensor:
        # Megatron normalises the layer output here; this layer's output stays the stream
        # state, read by the next depth, and `head_output` makes the loss input.
        return hidden_states

    def head_output(self, streams: Tensor) -> Tensor:
        """final_layernorm(mhc_head(X)) [s, b, C]: the input of the shared output layer."""
        contracted = self.mhc_head(streams.unflatten(-1, (self.num_streams, -1)))
        return super()._postprocess(contracted)

    def forward_single_position(self, *args, **kwargs):
        raise NotImplementedError(
            "speculative decoding with an mHC MTP layer is not supported: it needs the "
            "decoder's n-stream state at each verified position, and the inference context "
            "caches the contracted one"
        )


class MHCMultiTokenPredictionBlock(MultiTokenPredictionBlock):
    """Megatron's MTP block with the n-stream state passed from depth to depth.

    `forward` returns, like Megatron's, the decoder output followed by each depth's
    loss input, concatenated along the sequence ([(1 + D) s, b, C]) for `process_mtp_loss`.
    """

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        hidden_states: Tensor,
        attention_mask: Tensor,
        decoder_streams: Tensor | None = None,
        padding_mask: Tensor | None = None,
        **layer_kwargs,
    ) -> Tensor:
        """`hidden_states` is the decoder output [s, b, C] (contracted, normalised),
        `decoder_streams` its stream state before the contract [s, b, n*C]."""
        if decoder_streams is None:
            raise ValueError(
                "MHCMultiTokenPredictionBlock needs decoder_streams, the decoder's stream state "
                "before its final norm (MHCGPTModel and MHCHybridModel pass it)"
            )
        streams = decoder_streams.detach() if self.config.mtp_detach_heads else decoder_streams
        outputs = [hidden_states]
        for depth in range(self.config.mtp_num_layers):
            layer = self.layers[0 if self.mtp_use_repeated_layer else depth]
            streams, input_ids, position_ids, padding_mask = layer(
                input_ids=input_ids,
                position_ids=position_ids,
                hidden_states=streams,
                attention_mask=attention_mask,
                padding_mask=padding_mask,
                **layer_kwargs,
            )
            outputs.append(layer.head_output(streams))
        return torch.cat(outputs, dim=0)


class FinalStreamsCapture:
    """Keeps the input of the decoder's final norm, the stream state before the contract (a
    forward pre-hook run ahead of the contract's), for the MTP block of the same forward."""

    def __init__(self, final_norm: torch.nn.Module):
        self._streams = None
        final_norm.register_forward_pre_hook(self._keep, prepend=True)

    def _keep(self, _norm: torch.nn.Module, args: tuple) -> None:
        self._streams = args[0]

    def pass_to(self, mtp_block: MHCMultiTokenPredictionBlock) -> None:
        """Hand the kept streams to every forward of `mtp_block` as `decoder_streams`, for a
        model whose forward calls its MTP block without a way to add arguments (HybridModel)."""
        mtp_block.register_forward_pre_hook(self._add_decoder_streams, with_kwargs=True)

    def _add_decoder_streams(self, _block: torch.nn.Module, args: tuple, kwargs: dict):
        return args, {**kwargs, "decoder_streams": self.pop()}

    def pop(self) -> Tensor:
        """The streams of the latest forward, released here (one reader per forward)."""
        streams, self._streams = self._streams, None
        if streams is None:
            raise RuntimeError("the decoder's final norm has not run since the last pop()")
        return streams


def get_mhc_mtp_layer_spec(mtp_layer_spec: ModuleSpec) -> ModuleSpec:
    """Megatron's MTP layer spec made the mHC one: `e_proj` and `h_proj` of the linear class
    of its `eh_proj`, the learned head, the same norms and inner layer."""
    submodules = mtp_layer_spec.submodules
    return ModuleSpec(
        module=MHCMultiTokenPredictionLayer,
        params=dict(mtp_layer_spec.params),
        submodules=MHCMultiTokenPredictionLayerSubmodules(
            enorm=submodules.enorm,
            hnorm=submodules.hnorm,
            layer_norm=submodules.layer_norm,
            eh_proj=IdentityOp,
            e_proj=submodules.eh_proj,
            h_proj=submodules.eh_proj,
            mtp_model_layer=submodules.mtp_model_layer,
        ),
    )


def get_mhc_gpt_mtp_block_spec(
    config: MHCTransformerConfig,
    decoder_block_spec: TransformerBlockSubmodules,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> MultiTokenPredictionBlockSubmodules | None:
    """The MTP block spec of this stage (None where it holds no MTP layer).

    Megatron's GPT MTP spec, whose inner layer is the last layer of `decoder_block_spec` (so
    with mHC an HC layer); with mHC active its layers become MHCMultiTokenPredictionLayer. The
    local spec's torch norms are `SequenceParallelTorchNorm`s, as in the decoder.
    """
    use_te = config.transformer_impl == "transformer_engine"
    block_spec = get_gpt_mtp_block_spec(
        config,
        decoder_block_spec,
        use_transformer_engine=use_te,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    if block_spec is not None and not use_te:
        block_spec = with_sequence_parallel_norms(block_spec)
    if block_spec is None or not config.mhc_active:
        return block_spec
    return get_mhc_mtp_block_submodules(block_spec)


def get_mhc_mtp_block_submodules(
    block_submodules: MultiTokenPredictionBlockSubmodules,
) -> MultiTokenPredictionBlockSubmodules:
    """An MTP block's submodules with every layer spec made the mHC one
    (`get_mhc_mtp_layer_spec`)."""
    return replace(
        block_submodules,
        layer_specs=[get_mhc_mtp_layer_spec(spec) for spec in block_submodules.layer_specs],
    )
