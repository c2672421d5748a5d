"""HybridModel with mHC, built from an MHCTransformerConfig and a hybrid layer pattern."""

from megatron.core import tensor_parallel
from megatron.core.models.hybrid import hybrid_model
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer.multi_token_prediction import process_mtp_loss
from torch import Tensor

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.megatron_names import names_in
from megatron_mhc.transformer.hybrid_specs import check_hybrid_layer_pattern, get_hybrid_stack_spec
from megatron_mhc.transformer.multi_token_prediction import (
    FinalStreamsCapture,
    MHCMultiTokenPredictionBlock,
)
from megatron_mhc.transformer.schedule_nodes import MHCModelChunkSchedulePlan


class MHCHybridModel(HybridModel):
    """Megatron's HybridModel whose MTP block (the pattern's part after `/`) carries the n
    streams: an MHCMultiTokenPredictionBlock, handed the decoder's stream state before the
    contract (the input of the stack's final norm) by a FinalStreamsCapture on each forward.

    Takes HybridModel's arguments, its stack spec an mHC one (`get_hybrid_stack_spec`); the rest
    (stack, embedding, output layer, loss and MTP loss, checkpointing) is HybridModel's.
    `build_schedule_plan` gives the combined 1F1B schedule (`overlap_moe_expert_parallel_comm`)
    the mHC layers' nodes, as for a GPT (megatron-core 0.19.2's HybridModel has none); its pre-
    and post-process nodes call `_preprocess` and `_postprocess`, HybridModel.forward's
    training path before and after the stack.
    """

    def build_schedule_plan(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        decoder_input: Tensor | None = None,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        packed_seq_params=None,
        padding_mask: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> MHCModelChunkSchedulePlan:
        """The schedule plan of this chunk for one micro-batch (the arguments of forward)."""
        return MHCModelChunkSchedulePlan(
            self,
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
            loss_mask=loss_mask,
            padding_mask=padding_mask,
        )

    def _preprocess(
        self, input_ids, position_ids, decoder_input=None, packed_seq_params=None, **kwargs
    ):
        """HybridModel.forward before the stack: (decoder input, rotary embeddings, None, None,
        None, padding mask), the tuple of GPTModel._preprocess."""
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            if self.config.sequence_parallel and not self.embedding.scatter_to_sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(
                    decoder_input, group=self.pg_collection.tp
                )
        rotary_pos_emb = None
        # MLA layers apply their own rotary embedding.
        if self.position_embedding_type == "yarn" or (
            self.position_embedding_type == "rope" and not self.config.multi_latent_attention
        ):
            rotary_seq_len = self.rotary_pos_emb.get_rotary_seq_len(
                None, self.decoder, decoder_input, self.config, packed_seq_params
            )
            rotary_pos_emb = self.rotary_pos_emb(
                rotary_seq_len,
                packed_seq=packed_seq_params is not None and packed_seq_params.qkv_format == "thd",
            )
            if self.position_embedding_type == "yarn":
                rotary_pos_emb, _ = rotary_pos_emb  # (emb, mscale)
        return decoder_input, rotary_pos_emb, None, None, None, kwargs.get("padding_mask")

    def _postprocess(
        self,
        hidden_states,
        input_ids=None,
        labels=None,
        loss_mask=None,
        runtime_gather_output=None,
        packed_seq_params=None,
        **kwargs,
    ):
        """HybridModel.forward after the stack and its MTP block (training): the MTP loss
        attached by Megatron's `process_mtp_loss`, logits, and the per-token loss when `labels`
        are given."""
        if not self.post_process:
            return hidden_states
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        if self.config.mtp_num_layers is not None and self.mtp_process:
            hidden_states = process_mtp_loss(
                hidden_states=hidden_states,
                labels=labels,
                loss_mask=loss_mask,
                output_layer=self.output_layer,
                output_weight=output_weight,
                runtime_gather_output=runtime_gather_output,
                is_training=self.training,
                compute_language_model_loss=self.compute_language_model_loss,
                config=self.config,
                cp_group=self.pg_collection.cp,
                tp_group=self.tp_group,
                packed_seq_params=packed_seq_params,
                scale_logits_fn=self._scale_logits if self.config.use_mup else None,
                input_ids=input_ids,
            )
        logits, _ = self.output_layer(
            hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output
        )
        logits = self._scale_logits(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def __init__(self, config: MHCTransformerConfig, *args, **kwargs):
        # HybridModel.__init__ constructs `MultiTokenPredictionBlock(...)` by the name in its
        # module, with no argument to choose the class.
        with names_in(hybrid_model, MultiTokenPredictionBlock=MHCMultiTokenPredictionBlock):
            super().__init__(config, *args, **kwargs)
        if self.mtp_process:
            self.final_streams = FinalStreamsCapture(self.decoder.final_norm)
            self.final_streams.pass_to(self.mtp)


def build_mhc_hybrid_model(
    config: MHCTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    hybrid_layer_pattern: str,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
    **hybrid_model_kwargs,
) -> HybridModel:
    """Megatron's HybridModel for `hybrid_layer_pattern` (e.g. `*-*-E`, `|` between pipeline
    stages, `/` before each MTP depth), an MHCHybridModel with an mHC HyperConnectionHybridStack
    when mHC is active.

    The stack spec follows `config.transformer_impl`: 'local' (this project's local hybrid spec:
    `*`, `-`, `E` layers) or 'transformer_engine' (Megatron's). HybridModel builds the stack from
    the spec's module, so the model class itself is Megatron's; `hybrid_model_kwargs` go to it
    (position_embedding_type, share_embeddings_and_output_weights, ...). A pattern the config
    cannot build is a ValueError before anything is built.
    """
    if config.overlap_moe_expert_parallel_comm and not config.mhc_active:
        raise ValueError(
            "overlap_moe_expert_parallel_comm=True with a HybridModel needs mHC active "
            "(enable_mhc_connections=True, mhc_num_residual_streams > 1): megatron-core "
            "0.19.2's HybridModel has no build_schedule_plan, MHCHybridModel has one"
        )
    if config.overlap_moe_expert_parallel_comm and config.delay_wgrad_compute:
        raise ValueError(
            "delay_wgrad_compute=True is not supported with a HybridModel under "
            "overlap_moe_expert_parallel_comm: its MLP and MoE layers have no attention whose "
            "weight gradients the pre-dispatch node would delay"
        )
    check_hybrid_layer_pattern(config, hybrid_layer_pattern)
    model_class = MHCHybridModel if config.mhc_active else HybridModel
    return model_class(
        config,
        hybrid_stack_spec=get_hybrid_stack_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        hybrid_layer_pattern=hybrid_layer_pattern,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **hybrid_model_kwargs,
    )
