"""GPT with mHC, built from an MHCTransformerConfig."""

from megatron.core.models.common import model_chunk_schedule_plan
from megatron.core.models.gpt import gpt_model
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.megatron_names import names_in
from megatron_mhc.transformer.multi_token_prediction import (
    FinalStreamsCapture,
    MHCMultiTokenPredictionBlock,
    get_mhc_gpt_mtp_block_spec,
)
from megatron_mhc.transformer.schedule_nodes import MHCModelChunkSchedulePlan
from megatron_mhc.transformer.specs import get_mhc_gpt_decoder_block_spec
from megatron_mhc.transformer.transformer_block import HyperConnectionTransformerBlock


class MHCGPTModel(GPTModel):
    """Megatron's GPTModel whose decoder is a HyperConnectionTransformerBlock.

    Takes GPTModel's arguments; `transformer_layer_spec` should come from
    `get_mhc_gpt_decoder_block_spec` and `mtp_block_spec` from `get_mhc_gpt_mtp_block_spec`.
    The MTP block (an MHCMultiTokenPredictionBlock) reads the decoder's stream state before the
    contract, kept by a FinalStreamsCapture on the final norm. `build_schedule_plan` (the
    combined 1F1B schedule) gives the mHC layer's nodes. Everything else (embedding, output
    layer, loss and MTP loss, dist checkpointing, pipeline stages) is GPTModel's.
    """

    def __init__(self, config: MHCTransformerConfig, *args, **kwargs):
        if not config.mhc_active:
            raise ValueError(
                "MHCGPTModel needs mHC active (enable_mhc_connections=True and "
                f"mhc_num_residual_streams > 1, got {config.enable_mhc_connections} and "
                f"{config.mhc_num_residual_streams}); build_mhc_gpt_model returns a plain "
                "GPTModel otherwise"
            )
        with names_in(
            gpt_model,
            TransformerBlock=HyperConnectionTransformerBlock,
            MultiTokenPredictionBlock=MHCMultiTokenPredictionBlock,
        ):
            super().__init__(config, *args, **kwargs)
        if self.mtp_process:
            self.final_streams = FinalStreamsCapture(self.decoder.final_layernorm)

    def build_schedule_plan(self, *args, **kwargs):
        """GPTModel's schedule plan for the combined 1F1B schedule, with the mHC layer's nodes
        (an MHCModelChunkSchedulePlan, see megatron_mhc/transformer/schedule_nodes.py)."""
        with names_in(
            model_chunk_schedule_plan, TransformerModelChunkSchedulePlan=MHCModelChunkSchedulePlan
        ):
            return super().build_schedule_plan(*args, **kwargs)

    def _postprocess(self, hidden_states, **kwargs):
        # Under the combined 1F1B schedule the MTP layers are nodes of the schedule plan, which
        # take the streams themselves (`mtp_in_postprocess` False).
        if kwargs.get("mtp_in_postprocess"):
            # GPTModel passes `extra_block_kwargs` to its MTP block only (the decoder has run).
            kwargs["extra_block_kwargs"] = {
                **(kwargs.get("extra_block_kwargs") or {}),
                "decoder_streams": self.final_streams.pop(),
            }
        return super()._postprocess(hidden_states, **kwargs)


def build_mhc_gpt_model(
    config: MHCTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
    normalization: str | None = None,
    **gpt_model_kwargs,
) -> GPTModel:
    """A GPT model for `config`: MHCGPTModel when mHC is active, else Megatron's GPTModel.

    The layer spec is Megatron's GPT decoder spec for `config.transformer_impl` ('local' or
    'transformer_engine'), made mHC by `get_mhc_gpt_decoder_block_spec`; with
    `config.mtp_num_layers` the MTP block spec comes from `get_mhc_gpt_mtp_block_spec` (on the
    stage that holds it); `gpt_model_kwargs` go to GPTModel (position_embedding_type,
    share_embeddings_and_output_weights, ...).
    """
    pp_rank = None
    if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
        pp_rank = pg_collection.pp.rank()
    spec = get_mhc_gpt_decoder_block_spec(
        config, normalization=normalization, vp_stage=vp_stage, pp_rank=pp_rank
    )
    if config.mtp_num_layers:
        gpt_model_kwargs["mtp_block_spec"] = get_mhc_gpt_mtp_block_spec(
            config, spec, vp_stage=vp_stage, pp_rank=pp_rank
        )
    model_class = MHCGPTModel if config.mhc_active else GPTModel
    return model_class(
        config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **gpt_model_kwargs,
    )
