"""What megatron.training.pretrain needs to train an mHC GPT: model, datasets and step."""

import functools

import megatron.core.transformer
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
    get_model_config,
)
from megatron.training import get_args, get_tokenizer
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.utils import print_rank_0

from megatron_mhc.config import MHCMLATransformerConfig, MHCTransformerConfig
from megatron_mhc.data.default_corpus import prepare_default_corpus
from megatron_mhc.fusions.auto_backend import startup_summary
from megatron_mhc.megatron_names import names_in
from megatron_mhc.models.gpt import build_mhc_gpt_model
from megatron_mhc.models.hybrid import build_mhc_hybrid_model
from megatron_mhc.training.mhc_logging import health_log
from megatron_mhc.training.schedule_report import schedule_plans
from megatron_mhc.transformer.hyper_connection import time_hc_module


def mhc_config_from_args(args) -> MHCTransformerConfig:
    """megatron.training's config from the parsed flags, with the mHC fields: an
    MHCTransformerConfig, or an MHCMLATransformerConfig with --multi-latent-attention (which
    megatron.training also sets for a hybrid pattern with MLA layers)."""
    # core_transformer_config_from_args replaces the class it is given by the
    # MLATransformerConfig it looks up in megatron.core.transformer whenever MLA is on, which
    # would drop the mHC fields.
    with names_in(megatron.core.transformer, MLATransformerConfig=MHCMLATransformerConfig):
        return core_transformer_config_from_args(args, MHCTransformerConfig)


def model_provider(
    pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None
):
    """An mHC GPT (or Megatron's GPTModel when mHC is off) from the parsed flags; a HybridModel
    (with mHC when on) when --hybrid-layer-pattern is given."""
    args = get_args()
    config = mhc_config_from_args(args)
    kind = f"HybridModel {args.hybrid_layer_pattern}" if args.hybrid_layer_pattern else "GPT"
    print_rank_0(
        f"building {kind} model: mHC {'on' if config.mhc_active else 'off'} "
        f"(n={config.mhc_num_residual_streams}, type={config.mhc_type}, "
        f"contract={config.mhc_output_contract}, recompute={config.mhc_recompute_layer_num}), "
        f"{startup_summary(config, args.seq_length, args.micro_batch_size, time_hc_module)}"
    )
    model_kwargs = dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )
    if args.hybrid_layer_pattern is not None:
        model = build_mhc_hybrid_model(
            config, hybrid_layer_pattern=args.hybrid_layer_pattern, **model_kwargs
        )
    else:
        model = build_mhc_gpt_model(config, normalization=args.normalization, **model_kwargs)
    health_log.watch(model)
    return model


def check_mtp_arguments(args) -> None:
    """ValueError for the multi-token prediction settings megatron-core 0.19.2 cannot train."""
    if (
        args.mtp_num_layers
        and args.pipeline_model_parallel_size > 1
        and not args.untie_embeddings_and_output_weights
    ):
        raise ValueError(
            f"mtp_num_layers={args.mtp_num_layers} with pipeline_model_parallel_size="
            f"{args.pipeline_model_parallel_size} needs --untie-embeddings-and-output-weights: "
            "with tied embeddings megatron-core 0.19.2 keeps an unused output-layer weight on the "
            "MTP stage and fails to save its checkpoint"
        )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets: --data-path, the embedded corpus, or --mock-data (built where
    model chunk `vp_stage` of this rank reads tokens)."""
    args = get_args()
    if args.mock_data:
        dataset_type = MockGPTDataset
    else:
        dataset_type = GPTDataset
        if args.data_path is None and args.default_corpus:
            args.data_path = [prepare_default_corpus()]
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer() if get_tokenizer() is not None else build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    print_rank_0(f"building GPT datasets from {args.data_path or 'mock data'}")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, functools.partial(_reads_data, vp_stage), config
    ).build()


def _reads_data(vp_stage=None) -> bool:
    # Only the first and last (virtual) pipeline stages read tokens; TP rank 0 broadcasts them.
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        or parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    ) and parallel_state.get_tensor_model_parallel_rank() == 0


train_valid_test_datasets_provider.is_distributed = True


def forward_step(data_iterator, model, return_schedule_plan=False):
    """One micro-batch: the model's per-token losses and the masked-mean loss function; with
    `return_schedule_plan` (the combined 1F1B schedule of --overlap-moe-expert-parallel-comm)
    the model's schedule plan for the micro-batch instead of its output (counted: the run logs
    how many it built, megatron_mhc/training/schedule_report.py)."""
    config = get_model_config(model)
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    # The MTP block embeds the tokens and rolls the labels and loss mask on its own stage.
    has_mtp = mtp_on_this_rank(
        layout=config.pipeline_model_parallel_layout,
        mtp_num_layers=config.mtp_num_layers,
        ignore_virtual=False,
        vp_stage=vp_stage,
    )
    if first or last or has_mtp:
        batch = _batch(data_iterator, has_mtp, first, last)
    else:
        # A middle (virtual) stage computes on the previous stage's output and reads no data.
        batch = dict.fromkeys(("tokens", "position_ids", "attention_mask", "labels", "loss_mask"))
    health_log.start_if_logging()
    loss_mask = batch["loss_mask"]
    # The combined schedule runs the plan's nodes itself, interleaved with another micro-batch.
    run = model.build_schedule_plan if return_schedule_plan else model
    output = run(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=loss_mask,
    )
    if return_schedule_plan:
        schedule_plans.add(output)

    def loss_func(output_tensor):
        losses = output_tensor.view(-1).float()
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().clone().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}

    return output, loss_func


def _batch(data_iterator, has_mtp: bool, first: bool, last: bool) -> dict:
    """This rank's share of the next micro-batch: read on TP rank 0 and broadcast over TP, then
    cut to this rank's sequence share under context parallelism."""
    args = get_args()
    batch = {}
    if parallel_state.get_tensor_model_parallel_rank() == 0 and data_iterator is not None:
        batch = {
            k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v
            for k, v in next(data_iterator).items()
        }
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        broadcast_group=parallel_state.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=has_mtp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )
    return get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
    )
