"""Which schedule a run of pretrain_gpt_mhc.py took, said once in its log.

With `--overlap-moe-expert-parallel-comm` Megatron runs its combined 1F1B schedule, which asks
the forward step for the model chunk's schedule plan (`return_schedule_plan=True`) once per
model chunk and micro-batch, and runs the plan's nodes itself. Whether it does is decided by the
model config, not by the parsed flag: a config that lost the field trains on the plain schedule
while the printed arguments still say True. So the forward step counts the plans it actually
builds, and after the run's first iteration rank 0 logs the count, e.g.

    [mhc] schedule: combined 1F1B, 2 schedule plans built in the first iteration on rank 0,
          EP all-to-all overlapped

or `[mhc] schedule: plain, no schedule plan built, EP all-to-all not overlapped`.
"""

from megatron.core.pipeline_parallel.utils import AbstractSchedulePlan
from megatron.training.utils import print_rank_0


class SchedulePlanCount:
    """The schedule plans built by the forward step since the run started."""

    def __init__(self):
        self.built = 0
        self._reported = False

    def add(self, plan) -> None:
        """Count `plan`, the forward step's output under the combined schedule."""
        if not isinstance(plan, AbstractSchedulePlan):
            raise TypeError(
                f"the forward step built a {type(plan).__name__} where the combined 1F1B "
                "schedule needs a schedule plan"
            )
        self.built += 1

    def line(self) -> str:
        if self.built:
            return (
                f"[mhc] schedule: combined 1F1B, {self.built} schedule plans built in the first "
                "iteration on rank 0, EP all-to-all overlapped"
            )
        return "[mhc] schedule: plain, no schedule plan built, EP all-to-all not overlapped"

    def report_once(self) -> None:
        """Log `line()` on rank 0 the first time it is called (after the first iteration)."""
        if not self._reported:
            self._reported = True
            print_rank_0(self.line())


schedule_plans = SchedulePlanCount()
