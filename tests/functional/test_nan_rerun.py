"""A NaN on a single machine, end to end: a run whose learning rate is absurd stops once with
the explanation and exit code 17, saves nothing, and the documented way out (resume from the
last good checkpoint with a sane learning rate) continues with the losses of the run that never
went wrong; the good checkpoint stays byte for byte as it was.

Megatron's rerun state machine alone would save a checkpoint for a rerun on another GPU (over
the good checkpoint when the NaN follows it directly), exit 16, and exit 16 again on every
resume on the same machine.
"""

import re

import pytest

from megatron_mhc.checkpoint_conversion import upgrade_checkpoint
from tests.functional.pretrain_runs import file_digests, run_pretrain
from tests.functional.test_checkpoint_conversion import FLAGS, LEGACY, LEGACY_LOSSES

# From the good checkpoint at iteration 2, the learning rate raised from 3e-3 to 1e6 (a new
# learning rate is a new optimizer parameter group for Megatron, hence the two other flags).
ABSURD_LR = ["--lr", "1e6", "--override-opt-param-scheduler", "--no-load-optim"]
# Long enough for the NaN to come (the legacy run itself stops at iteration 4).
LONGER = ["--train-iters", "8"]


def test_nan_stops_once_with_the_way_out_which_resumes_from_the_untouched_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    upgrade_checkpoint(LEGACY, checkpoints)  # a good checkpoint at iteration 2
    good = file_digests(checkpoints)

    with pytest.raises(RuntimeError):
        run_pretrain(tmp_path, *FLAGS, *LONGER, *ABSURD_LR)
    log = (tmp_path / "run0.log").read_text()
    logged = re.findall(r"rerun_machine:(pretrain_gpt_mhc\.py: exit code 17: .*)", log)
    assert len(logged) == 1, log[-3000:]  # rank 0 only
    explanation = logged[0]
    # torchrun's summary, printed last, names it as the cause.
    assert re.search(
        r"exitcode\s*: 17.*\n.*\n\s*traceback : pretrain_gpt_mhc\.py: exit code 17", log
    )
    assert "again when the iteration was rerun on the same devices" in explanation
    assert f"the last checkpoint (iteration 2 in {checkpoints}) is kept as it was" in explanation
    assert "--override-opt-param-scheduler --no-load-optim" in explanation
    assert "saving checkpoint" not in log and "rescheduled on the same GPU" not in log
    assert file_digests(checkpoints) == good

    # The way out: resume from the last checkpoint with the learning rate it was saved with;
    # the losses are those of the legacy run that never went wrong.
    _, losses = run_pretrain(tmp_path, *FLAGS)
    assert sorted(losses) == [3, 4]
    for iteration, value in LEGACY_LOSSES.items():
        assert losses[iteration] == pytest.approx(value, rel=1e-5), iteration
    after = file_digests(checkpoints)
    assert {k: v for k, v in after.items() if k.startswith("iter_0000002/")} == {
        k: v for k, v in good.items() if k.startswith("iter_0000002/")
    }
