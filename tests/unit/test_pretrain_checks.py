"""pretrain_gpt_mhc.py's own checks of a launch, before any setup: a mixed-precision mHC run
that would fail at its first checkpoint save is refused with the way out."""

import argparse

import pytest

from megatron_mhc.training.gpt_step import check_optimizer_checkpointing
from tests.tiny_gpt import tiny_config

MHC = tiny_config(enable_mhc_connections=True)


def _args(**flags):
    return argparse.Namespace(
        **{"bf16": False, "fp16": False, "save": "runs/x", "no_save_optim": False, **flags}
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_mhc_run_saving_optimizer_state_is_refused(precision):
    with pytest.raises(
        ValueError,
        match=rf"--{precision} with mHC and --save runs/x: .*"
        r"--no-save-optim",
    ):
        check_optimizer_checkpointing(_args(**{precision: True}), MHC)


@pytest.mark.parametrize(
    "args,config",
    [
        (_args(bf16=True, no_save_optim=True), MHC),
        (_args(bf16=True, save=None), MHC),
        (_args(), MHC),
        (_args(bf16=True), tiny_config()),
    ],
    ids=["no-save-optim", "no-save", "fp32", "mhc-off"],
)
def test_runs_that_can_checkpoint_pass(args, config):
    check_optimizer_checkpointing(args, config)
