"""pretrain_gpt_mhc.py with the EP all-to-all overlap (--overlap-moe-expert-parallel-comm,
Megatron's combined 1F1B schedule over the mHC layer's nodes) trains the tiny MoE mHC GPT
(configs/gpt_tiny_moe_mhc.yaml: EP=2 on 2 processes, bf16) with one MTP depth, and the
DeepSeek-V4-shaped tiny hybrid (configs/hybrid_tiny_moe_mtp_mhc.yaml: MLA and MoE layers, an MTP
depth, the mHC recompute manager), bitwise as the plain schedule does, with the MTP loss logged,
and really takes the combined schedule: the run logs the schedule plans its forward step built
(a model config without the overlap would train on the plain schedule, with the same losses and
the flag still printed True)."""

import re

import pytest

from tests.functional.pretrain_runs import run_pretrain

CONFIG = "configs/gpt_tiny_moe_mhc.yaml"
HYBRID_CONFIG = "configs/hybrid_tiny_moe_mtp_mhc.yaml"
ITERATIONS = 8
FLAGS = ["--train-iters", str(ITERATIONS), "--mtp-num-layers", "1"]
# One plan per model chunk and micro-batch: global batch 8 / (micro-batch 2 x data parallel 2)
# = 2 micro-batches per iteration, one model chunk (PP = 1), in both configs.
PLANS_PER_ITERATION = 2
_MTP_LOSS = re.compile(r"iteration +(\d+)/ *\d+ \|.* mtp_1 loss: ([^ |]+) \|")


@pytest.mark.parametrize(
    "config,flags",
    [
        (CONFIG, FLAGS),
        # The MTP depth is in the pattern, the recompute manager in the file.
        (HYBRID_CONFIG, ["--train-iters", str(ITERATIONS)]),
    ],
    ids=["gpt_mtp", "hybrid_mla_moe_mtp"],
)
def test_overlapped_run_has_the_plain_runs_losses_bitwise_and_builds_schedule_plans(
    tmp_path, config, flags
):
    (tmp_path / "plain").mkdir()
    (tmp_path / "overlap").mkdir()
    plain_log, plain = run_pretrain(tmp_path / "plain", *flags, config=config)
    log, overlapped = run_pretrain(
        tmp_path / "overlap", *flags, "--overlap-moe-expert-parallel-comm", config=config
    )
    assert (
        "[mhc] schedule: plain, no schedule plan built, EP all-to-all not overlapped" in plain_log
    )
    assert (
        f"[mhc] schedule: combined 1F1B, {PLANS_PER_ITERATION} schedule plans built in the first "
        "iteration on rank 0, EP all-to-all overlapped"
    ) in log
    assert log.count("[mhc] schedule:") == 1
    assert sorted(plain) == list(range(1, ITERATIONS + 1))
    assert overlapped == plain
    # The MTP loss, as Megatron logs it, at every iteration of both runs, the same.
    plain_mtp = dict(_MTP_LOSS.findall(plain_log))
    assert sorted(int(i) for i in plain_mtp) == list(range(1, ITERATIONS + 1))
    assert dict(_MTP_LOSS.findall(log)) == plain_mtp
