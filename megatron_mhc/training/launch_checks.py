"""Every check of a pretrain_gpt_mhc.py launch that runs before anything is set up or written:
Megatron's argument parsing and validation plus megatron-mhc's own checks. The real launch and
the dry run call the same `parse_and_check_arguments`, so a dry run validates exactly what a
launch would."""

from megatron.training.arguments import parse_and_validate_args

from megatron_mhc.checkpoint_conversion import check_no_legacy_names
from megatron_mhc.training.arguments import add_mhc_arguments
from megatron_mhc.training.gpt_step import (
    check_mtp_arguments,
    check_optimizer_checkpointing,
    mhc_config_from_args,
)
from megatron_mhc.transformer.hybrid_specs import check_hybrid_layer_pattern


def parse_and_check_arguments():
    """(args, config): the parsed flags and the model config, or ConfigError / ValueError."""
    args = parse_and_validate_args(extra_args_provider=add_mhc_arguments)
    # The model config (mHC fields included) and the hybrid layer pattern, before Megatron
    # sets anything up.
    config = mhc_config_from_args(args)
    if args.hybrid_layer_pattern is not None:
        check_hybrid_layer_pattern(config, args.hybrid_layer_pattern)
    check_mtp_arguments(args)
    check_optimizer_checkpointing(args, config)
    check_no_legacy_names(args.load)
    return args, config
