"""Command-line flags of pretrain_gpt_mhc.py on top of Megatron's: the mHC fields of
MHCTransformerConfig, `--config` (a YAML run config), and `--default-corpus`."""

import argparse
import dataclasses
import sys

from megatron_mhc.config import MHC_INITS, MHC_OUTPUT_CONTRACTS, MHC_TYPES, MHCTransformerConfig
from megatron_mhc.fusions import KERNEL_BACKENDS
from megatron_mhc.training.yaml_config import load_yaml_config


def _layer_num(value: str):
    return value if value == "auto" else int(value)


def _mhc_flags():
    """(field, argparse kwargs, help) for every mHC field of MHCTransformerConfig."""
    return [
        (
            "enable_mhc_connections",
            dict(action="store_true"),
            "Widen the residual stream into --mhc-num-residual-streams streams (mHC).",
        ),
        ("mhc_num_residual_streams", dict(type=int), "n, the number of residual streams."),
        (
            "mhc_type",
            dict(choices=MHC_TYPES),
            "mhc (Sinkhorn-projected mixing), hc (dynamic hyper-connections) or hc_static.",
        ),
        ("mhc_sinkhorn_iterations", dict(type=int), "Sinkhorn-Knopp iterations."),
        ("mhc_eps", dict(type=float), "Epsilon added to H_pre and in the Sinkhorn steps."),
        ("mhc_norm_eps", dict(type=float), "Epsilon of the RMS normalisation in the mappings."),
        ("mhc_init_gating_factor", dict(type=float), "Initial gating factors alpha."),
        (
            "mhc_init",
            dict(choices=MHC_INITS),
            "default (small random projection) or identity (function-preserving, to upcycle).",
        ),
        (
            "mhc_output_contract",
            dict(choices=MHC_OUTPUT_CONTRACTS),
            "How the streams become one before the final norm.",
        ),
        ("mhc_kernel_backend", dict(choices=KERNEL_BACKENDS), "Implementation of the mHC ops."),
        (
            "mhc_mlp_high_priority_stream",
            dict(action="store_true"),
            "Run the MLP's HC update on a high-priority CUDA stream (needs a GPU).",
        ),
        (
            "mhc_recompute_layer_num",
            dict(type=_layer_num),
            "L_r: recompute the n-stream states per block of L_r layers ('auto': eq. 20); "
            "default: keep them.",
        ),
    ]


def add_mhc_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's `extra_args_provider`: adds the flags, then applies the `--config` YAML file
    as flag defaults (so that command-line flags override it)."""
    defaults = {f.name: f.default for f in dataclasses.fields(MHCTransformerConfig)}
    group = parser.add_argument_group("mHC (manifold-constrained hyper-connections)")
    for field, kwargs, help_text in _mhc_flags():
        group.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            default=defaults[field],
            help=f"{help_text} Default: {defaults[field]}.",
            **kwargs,
        )
    run = parser.add_argument_group("megatron-mhc run")
    run.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="YAML run config (sections model, mhc, parallel, train, optimizer, "
        "data, checkpoint, logging); command-line flags override it.",
    )
    run.add_argument(
        "--default-corpus",
        action="store_true",
        help="Train on the embedded corpus (built into the cache on first use) when "
        "no --data-path is given; use it with --tokenizer-type NullTokenizer "
        "--vocab-size 8192.",
    )
    config_path = _config_path(sys.argv[1:])
    if config_path is not None:
        parser.set_defaults(**load_yaml_config(config_path, parser))
    return parser


def _config_path(argv):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    return pre.parse_known_args(argv)[0].config
