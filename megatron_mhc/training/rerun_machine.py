"""Megatron's rerun state machine, with a NaN on a single machine ending the run once.

With `--rerun-mode validate_results` (Megatron's default) and `--check-for-nan-in-loss-and-grad`
(also the default), a NaN or Inf in the loss or a gradient makes Megatron rerun the iteration in
place. When the rerun reproduces it, Megatron suspects a faulty GPU as much as the training
itself, saves a checkpoint before the failing iteration and exits with code 16
(EXIT_CODE_RESUME_TO_DISAMBIGUATE), asking to be resumed on another GPU, where a third run tells
the two apart. On a single machine the resume gets the same GPUs, Megatron finds "rescheduled on
the same GPU" and exits 16 again, on every resume; and when the failing iteration directly
follows a checkpoint, that save rewrites the last good checkpoint with the rerun request in it.

`MHCRerunStateMachine` keeps Megatron's protocol on multi-node jobs and explains every exit. When
every process of the job runs on one node (torchrun's LOCAL_WORLD_SIZE equals WORLD_SIZE), where
no other GPU can take the rerun, a reproduced NaN stops the run at once with exit code 17
(EXIT_CODE_FAILED_ON_RESULT_VALIDATION, Megatron's "do not resume as is"), saves nothing, and
says how to resume from the last checkpoint. docs/errors.md describes both exit codes.
"""

import logging
import os

from megatron.core.rerun_state_machine import (
    EXIT_CODE_FAILED_ON_RESULT_VALIDATION,
    RerunMode,
    RerunState,
    RerunStateMachine,
)
from megatron.core.utils import log_single_rank
from megatron.training import get_args

from megatron_mhc.training.checkpoint_checks import TRACKER
from megatron_mhc.training.launch_checks import hand_to_torchrun

logger = logging.getLogger(__name__)

_WAY_OUT = (
    "To continue, resume from a checkpoint saved before the loss rose (--ckpt-step N picks an "
    "earlier one) with what caused it changed; a new learning rate needs --lr X "
    "--override-opt-param-scheduler --no-load-optim (Megatron keys the optimizer state by "
    "learning rate). docs/errors.md explains"
)


def single_node_job() -> bool:
    """Whether all processes of this job run on this node (torchrun's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) == world


def _last_checkpoint() -> str:
    save = get_args().save
    tracker = os.path.join(save, TRACKER) if save else None
    if tracker is None or not os.path.isfile(tracker):
        return "none saved yet"
    with open(tracker) as f:
        return f"iteration {f.read().strip()} in {save}"


class MHCRerunStateMachine(RerunStateMachine):
    """Megatron's RerunStateMachine; a reproduced NaN / Inf on a single-node job exits 17 without
    saving, and every exit of the machine is explained in one message on rank 0."""

    def should_checkpoint_and_exit(self):
        # Megatron's messages add 1 to current_iteration, which already counts from 1 (the
        # iteration of Megatron's log line).
        iteration = self.current_iteration
        failed = self.failed_validation_call
        what = f"'{failed.caller.message}'" if failed is not None else "an unexpected result"
        state = self.state
        reproduced = state == RerunState.WILL_RERUN_FROM_CHECKPOINT
        if self.mode == RerunMode.VALIDATE_RESULTS and reproduced and single_node_job():
            self.first_iteration_complete = True
            self._explain(
                EXIT_CODE_FAILED_ON_RESULT_VALIDATION,
                f"{what} at iteration {iteration}, and again when the iteration was rerun on "
                "the same devices: the training itself most likely produces it (a learning "
                "rate too high, bad data, an unstable configuration) rather than faulty "
                "hardware. A single-node job cannot rerun it on another GPU, so nothing was "
                f"saved: the last checkpoint ({_last_checkpoint()}) is kept as it was. "
                f"{_WAY_OUT}. To check the hardware instead, resume unchanged on another "
                "machine",
            )
            return False, True, EXIT_CODE_FAILED_ON_RESULT_VALIDATION
        should_checkpoint, should_exit, exit_code = super().should_checkpoint_and_exit()
        if should_exit:
            self._explain(exit_code, self._reason(state, what, iteration))
        return should_checkpoint, should_exit, exit_code

    @staticmethod
    def _reason(state: RerunState, what: str, iteration: int) -> str:
        if state == RerunState.WILL_RERUN_FROM_CHECKPOINT:
            return (
                f"{what} at iteration {iteration}, reproduced by a rerun on the same GPU: a "
                f"checkpoint before iteration {iteration} was saved; resume the job on other "
                "GPUs to tell a faulty GPU from the training's own NaN. A resume on the same "
                "GPUs asks again: there, resume with --rerun-mode disabled (a NaN then stops the "
                f"run with an error) or from an earlier checkpoint (--ckpt-step N). {_WAY_OUT}"
            )
        if state == RerunState.RERUNNING_AGAIN_FROM_CHECKPOINT:
            return (
                f"the job was resumed on the same GPU that produced {what} at iteration "
                f"{iteration}, so the rerun cannot tell a faulty GPU from the training's own "
                "NaN. Resume on other GPUs, or with --rerun-mode disabled, or from an earlier "
                f"checkpoint (--ckpt-step N). {_WAY_OUT}"
            )
        if state == RerunState.RERUNNING_IN_PLACE:
            return (
                f"{what} at iteration {iteration} did not recur when the iteration was rerun: "
                "likely a transient hardware error. Resume from the last checkpoint unchanged"
            )
        return (
            f"{what} at iteration {iteration} recurred on another GPU: the training itself "
            f"produces it. {_WAY_OUT}"
        )

    @staticmethod
    def _explain(exit_code: int, reason: str) -> None:
        line = f"pretrain_gpt_mhc.py: exit code {exit_code}: {reason}"
        log_single_rank(logger, logging.ERROR, line)
        # Every rank: torchrun's summary names the rank that exited first, any of them.
        hand_to_torchrun(line)
