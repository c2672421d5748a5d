"""Command-line flags of pretrain_gpt_mhc.py on top of Megatron's: the mHC fields of
MHCTransformerConfig, `--config` (a YAML run config), and `--default-corpus`."""

import argparse
import dataclasses
import re
import sys
import types
import typing

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.argument_utils import ArgumentGroupFactory

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.training.yaml_config import load_yaml_config


def _integer_or_one_of(words: tuple[str, ...]):
    def integer_or_word(value):
        if value in words:
            return value
        try:
            return int(value)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither an integer nor one of {list(words)}"
            ) from err

    return integer_or_word


class MHCArgumentGroupFactory(ArgumentGroupFactory):
    """Megatron's flags-from-dataclass factory for the fields MHCTransformerConfig adds to
    TransformerConfig (Megatron adds TransformerConfig's own): each flag's type, choices
    (`Literal[...]`), default and help (the field's docstring) come from its field."""

    def __init__(self):
        super().__init__(
            MHCTransformerConfig, exclude=[f.name for f in dataclasses.fields(TransformerConfig)]
        )

    def _extract_type(self, config_type) -> dict[str, typing.Any]:
        # `int | Literal[words] | None`, beyond Megatron's types: an integer or one of the words.
        members = [t for t in typing.get_args(config_type) if t is not type(None)]
        if (
            typing.get_origin(config_type) in (typing.Union, types.UnionType)
            and len(members) == 2
            and int in members
        ):
            (words,) = [t for t in members if t is not int]
            if typing.get_origin(words) is typing.Literal:
                return {"type": _integer_or_one_of(typing.get_args(words))}
        return super()._extract_type(config_type)

    def _build_argparse_kwargs_from_field(self, attribute) -> dict[str, typing.Any]:
        kwargs = super()._build_argparse_kwargs_from_field(attribute)
        # Megatron's parser does not show defaults; the mHC ones matter to read a run's setup.
        kwargs["help"] = f"{kwargs['help']} Default: {kwargs['default']}."
        return kwargs


class UsageError(ValueError):
    """A command line argparse refuses (an unknown flag, a value its flag does not take), as
    the one line of a refused launch."""


def _refuse_usage(message: str):
    raise UsageError(f"{message} (see pretrain_gpt_mhc.py --help)")


def errors_in_one_line(parser: argparse.ArgumentParser) -> None:
    """argparse prints its whole usage before a usage error (with Megatron's flags about 750
    lines, which bury the message) and exits every process on its own; raised as UsageError,
    the error is printed as one line by rank 0 and named as torchrun's cause like every other
    refused launch (launch_checks.launch_errors_reported)."""
    parser.error = _refuse_usage


def add_mhc_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's `extra_args_provider`: adds the flags, then applies the `--config` YAML file
    as flag defaults (so that command-line flags override it)."""
    errors_in_one_line(parser)
    MHCArgumentGroupFactory().build_group(parser, "mHC (manifold-constrained hyper-connections)")
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
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="Check the launch on --world-size GPUs without starting it (any machine, no data): "
        "validate every flag, build each pipeline stage on the meta device, print the layout, "
        "parameters and memory per GPU.",
    )
    run.add_argument("--world-size", type=int, default=None, help="GPUs of a --dry-run.")
    config_path = _config_path(sys.argv[1:])
    if config_path is not None:
        parser.set_defaults(**load_yaml_config(config_path, parser))
    _escape_percent_signs_in_help(parser)
    return parser


def _escape_percent_signs_in_help(parser: argparse.ArgumentParser) -> None:
    """argparse %-formats every help text, and megatron-core 0.19.2's help generated from
    docstrings has literal ones ("1.10 = 10%)"), which make `--help` fail with "unsupported
    format character"; `%(default)s`-style references are kept."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(
                r"%%|%\(\w+\)\w|%", lambda m: m[0] if len(m[0]) > 1 else "%%", action.help
            )


def _config_path(argv):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    errors_in_one_line(pre)
    pre.add_argument("--config", default=None)
    return pre.parse_known_args(argv)[0].config
