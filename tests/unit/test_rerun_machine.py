"""MHCRerunStateMachine's choice when a rerun reproduced a NaN: on a single-node job exit 17
without saving; on a multi-node job Megatron's protocol (save, exit 16). The end-to-end run is
tests/functional/test_nan_rerun.py."""

import argparse
import os

import pytest

from tests.dist_utils import run_distributed


def _decision(rank, world_size, local_world_size, save_dir):
    from megatron.core.rerun_state_machine import RerunMode, RerunState
    from megatron.training.global_vars import set_args

    from megatron_mhc.training.rerun_machine import MHCRerunStateMachine

    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE=str(local_world_size))
    os.environ.pop("TORCHELASTIC_ERROR_FILE", None)
    set_args(argparse.Namespace(save=save_dir))
    machine = MHCRerunStateMachine(mode=RerunMode.VALIDATE_RESULTS)
    machine.state = RerunState.WILL_RERUN_FROM_CHECKPOINT
    machine.current_iteration = 6
    return machine.should_checkpoint_and_exit()


@pytest.mark.parametrize(
    "local_world_size,expected",
    [(2, (False, True, 17)), (1, (True, True, 16))],
    ids=["single-node: exit 17, nothing saved", "multi-node: Megatron's save and exit 16"],
)
def test_reproduced_nan_on_single_node_exits_17_without_saving(
    local_world_size, expected, tmp_path
):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    (decision,) = run_distributed(_decision, 1, local_world_size, str(tmp_path))
    assert tuple(decision) == expected
