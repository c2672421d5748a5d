"""pretrain_gpt_mhc.py with TP=2 and sequence parallelism (2 gloo processes, the local spec's
torch norms) trains the tiny mHC GPT as TP=1 with two data-parallel replicas does."""

import re

import pytest

from tests.functional.pretrain_runs import run_pretrain

SHORT_RUN = ["--train-iters", "10", "--pipeline-model-parallel-size", "1"]


def test_tp2_sequence_parallel_trains_as_tp1_dp2(tmp_path):
    logs, losses = {}, {}
    for name, flags in {"tp2_sp": ["2", "--sequence-parallel"], "tp1_dp2": ["1"]}.items():
        logs[name], losses[name] = run_pretrain(
            tmp_path / name, *SHORT_RUN, "--tensor-model-parallel-size", *flags
        )
    assert re.search(r"^  sequence_parallel \.+ True$", logs["tp2_sp"], re.MULTILINE)
    assert sorted(losses["tp2_sp"]) == sorted(losses["tp1_dp2"]) == list(range(1, 11))
    for iteration, loss in losses["tp1_dp2"].items():
        # Same initial weights and data, partitioned otherwise: equal up to fp32 rounding.
        assert losses["tp2_sp"][iteration] == pytest.approx(loss, rel=1e-4), iteration
