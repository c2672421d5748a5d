"""The mHC flags of pretrain_gpt_mhc.py, generated from MHCTransformerConfig's fields: one flag
per mHC field with the field's default, choices and docstring, and bad values rejected by argparse
naming the flag."""

import dataclasses
import typing

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.training.arguments import UsageError

MHC_FIELDS = [
    f
    for f in dataclasses.fields(MHCTransformerConfig)
    if f.name not in {g.name for g in dataclasses.fields(TransformerConfig)}
]


def _flag(parser, field_name):
    (action,) = [a for a in parser._actions if a.dest == field_name]
    return action


def test_every_mhc_field_has_its_flag_default_and_choices(parser):
    assert {f.name for f in MHC_FIELDS} >= {
        "enable_mhc_connections",
        "mhc_num_residual_streams",
        "mhc_type",
        "mhc_kernel_backend",
        "mhc_recompute_layer_num",
    }
    for field in MHC_FIELDS:
        action = _flag(parser, field.name)
        assert action.option_strings == ["--" + field.name.replace("_", "-")], field.name
        assert action.default == field.default, field.name
        assert action.help.endswith(f"Default: {field.default}."), field.name
        assert len(action.help) > len(f" Default: {field.default}.") + 20, field.name
        if typing.get_origin(field.type) is typing.Literal:
            assert tuple(action.choices) == typing.get_args(field.type), field.name
        elif field.type is bool:
            assert action.nargs == 0 and action.const is True, field.name  # a store_true switch
        else:
            assert action.choices is None, field.name
    mhc_dests = {a.dest for a in parser._actions if a.dest.startswith("mhc_") or "_mhc_" in a.dest}
    assert mhc_dests == {f.name for f in MHC_FIELDS}


def test_flags_parse_into_the_fields_types(parser):
    args = parser.parse_args(
        [
            "--enable-mhc-connections",
            "--mhc-num-residual-streams=2",
            "--mhc-type=hc_static",
            "--mhc-eps=1e-5",
            "--mhc-kernel-backend=torch",
            "--mhc-recompute-layer-num=3",
        ]
    )
    assert args.enable_mhc_connections is True
    assert (args.mhc_num_residual_streams, args.mhc_type) == (2, "hc_static")
    assert (args.mhc_eps, args.mhc_kernel_backend, args.mhc_recompute_layer_num) == (
        1e-5,
        "torch",
        3,
    )
    assert parser.parse_args(["--mhc-recompute-layer-num=auto"]).mhc_recompute_layer_num == "auto"
    kwargs = {f.name: getattr(args, f.name) for f in MHC_FIELDS}
    config = MHCTransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **kwargs)
    assert config.mhc_active and config.mhc_recompute_layer_num == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--mhc-type", "mHC"],
            "argument --mhc-type: invalid choice: 'mHC' (choose from 'mhc', 'hc', 'hc_static')",
        ),
        (
            ["--mhc-kernel-backend", "cuda"],
            "argument --mhc-kernel-backend: invalid choice: 'cuda' "
            "(choose from 'auto', 'torch', 'triton', 'cutile')",
        ),
        (
            ["--mhc-recompute-layer-num", "sqrt"],
            "argument --mhc-recompute-layer-num: 'sqrt' is neither an integer nor one of ['auto']",
        ),
        (
            ["--mhc-num-residual-streams", "four"],
            "argument --mhc-num-residual-streams: invalid int value: 'four'",
        ),
    ],
)
def test_bad_value_is_one_usage_error_line_naming_the_flag(parser, capsys, argv, message):
    with pytest.raises(UsageError) as refused:
        parser.parse_args(argv)
    assert str(refused.value) == f"{message} (see pretrain_gpt_mhc.py --help)"
    assert capsys.readouterr().err == ""  # no usage block: the launch prints the one line


def test_help_of_every_flag_formats(parser):
    # megatron-core's help texts generated from docstrings carry literal '%' signs
    # (--moe-paged-stash-buffer-size-factor-cuda: "10%"), which argparse would reject.
    text = parser.format_help()
    assert "--mhc-num-residual-streams" in text
    assert "10%)" in text
