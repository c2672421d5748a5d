"""A resumed launch's learning-rate schedule against the checkpoint's, before any setup.

Megatron restores the learning-rate and weight-decay schedule from the checkpoint and, unless
told which one wins, asserts that this launch computes the same schedule (its length in
samples, warm-up, peak and final rate, decay style, weight-decay ramp). The assertion comes
only after the model and optimizer are built and names no flag: training a finished run further
with `--train-iters 600` ends in `AssertionError: OptimizerParamScheduler: class input value
4800 and checkpoint value 2400 ...` on every rank. `check_schedule_against_checkpoint` runs
Megatron's own comparison (its scheduler, built from this launch's flags, loading the
checkpoint's schedule) at launch, and restates a refusal as one line naming both ways out.
"""

import copy
import types
from argparse import Namespace

from megatron.training.checkpointing import _load_base_checkpoint
from megatron.training.training import get_optimizer_param_scheduler

from megatron_mhc.megatron_patches import MegatronPatch

# get_optimizer_param_scheduler reads megatron.training's global arguments, which are set only
# once the launch has passed its checks; while it builds this launch's scheduler here, the name
# it reads them through answers with the flags being checked (docs/megatron_patches.md).
SCHEDULE_FLAGS = MegatronPatch(
    "launch checks: the flags of the learning-rate schedule",
    "megatron.training.training",
    "get_args",
)

_SCHEDULE_ENTRIES = {
    "max_lr": "peak learning rate (--lr)",
    "min_lr": "final learning rate (--min-lr)",
    "lr_warmup_steps": "warm-up",
    "lr_decay_steps": "decay length",
    "lr_decay_style": "decay style",
    "start_wd": "start weight decay",
    "end_wd": "end weight decay",
    "wd_incr_steps": "weight-decay ramp length",
    "wd_incr_style": "weight-decay ramp style",
}
"""The entries of OptimizerParamScheduler.state_dict() that its load_state_dict compares."""


def _checkpoint_state(args: Namespace) -> dict | None:
    """The non-tensor state of the checkpoint this launch resumes from (Megatron's own reader,
    which follows the tracker file or --ckpt-step); None when there is none to resume from."""
    if args.load is None or args.finetune or args.no_load_optim:
        # --finetune starts a fresh schedule; with --no-load-optim Megatron loads none either
        # (and megatron-mhc steps this launch's schedule to the checkpoint's samples).
        return None
    state_dict, _, release, _ = _load_base_checkpoint(args.load, args, rank0=True)
    return None if not state_dict or release else state_dict


def _schedule_of_this_launch(args: Namespace):
    """Megatron's OptimizerParamScheduler of `args`, over a stand-in optimizer (the scheduler
    only sets each group's learning rate and weight decay)."""
    stand_in = types.SimpleNamespace(param_groups=[{}])
    flags = copy.copy(args)  # it fills in defaults (--lr-decay-iters) on what it reads
    with SCHEDULE_FLAGS.replaced(lambda: flags):
        return get_optimizer_param_scheduler(stand_in)


def check_schedule_against_checkpoint(args: Namespace) -> None:
    """ValueError, naming --use-checkpoint-opt_param-scheduler and --override-opt-param-
    scheduler, when Megatron would refuse the checkpoint's learning-rate schedule after setup.
    `args` are validated flags (after Megatron's `validate_args`)."""
    state_dict = _checkpoint_state(args)
    if state_dict is None:
        return
    saved = state_dict.get("opt_param_scheduler", state_dict.get("lr_scheduler"))
    if saved is None:
        return
    scheduler = _schedule_of_this_launch(args)
    ours = scheduler.state_dict()
    try:
        scheduler.load_state_dict(copy.deepcopy(saved))
    except AssertionError:
        differences = "; ".join(
            f"{what}: {ours[key]} here, {saved[key]} in the checkpoint"
            for key, what in _SCHEDULE_ENTRIES.items()
            if key in saved and saved[key] != ours[key]
        )
        raise ValueError(
            f"--load {args.load}: this launch's learning-rate schedule differs from the one the "
            f"checkpoint of iteration {state_dict.get('iteration')} was trained with "
            f"({differences}; lengths in samples, iterations x global batch "
            f"{args.global_batch_size}). To train on with the checkpoint's schedule (after it "
            "ends the learning rate stays at its final value), add "
            "--use-checkpoint-opt_param-scheduler; to switch to this launch's schedule at the "
            "checkpoint's iteration (the learning rate jumps to where the new schedule is "
            "there), add --override-opt-param-scheduler"
        ) from None
