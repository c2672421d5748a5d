"""HybridModel with mHC, built from an MHCTransformerConfig and a hybrid layer pattern."""

from megatron.core.models.hybrid import hybrid_model
from megatron.core.models.hybrid.hybrid_model import HybridModel

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.megatron_names import names_in
from megatron_mhc.transformer.hybrid_specs import check_hybrid_layer_pattern, get_hybrid_stack_spec
from megatron_mhc.transformer.multi_token_prediction import (
    FinalStreamsCapture,
    MHCMultiTokenPredictionBlock,
)


class MHCHybridModel(HybridModel):
    """Megatron's HybridModel whose MTP block (the pattern's part after `/`) carries the n
    streams: an MHCMultiTokenPredictionBlock, handed the decoder's stream state before the
    contract (the input of the stack's final norm) by a FinalStreamsCapture on each forward.

    Takes HybridModel's arguments, its stack spec an mHC one (`get_hybrid_stack_spec`); the rest
    (stack, embedding, output layer, loss and MTP loss, checkpointing) is HybridModel's.
    """

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
    if config.overlap_moe_expert_parallel_comm:
        raise ValueError(
            "overlap_moe_expert_parallel_comm=True is not supported with a HybridModel "
            f"(hybrid_layer_pattern={hybrid_layer_pattern!r}): megatron-core 0.19.2's "
            "HybridModel has no build_schedule_plan, which the combined 1F1B schedule calls"
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
