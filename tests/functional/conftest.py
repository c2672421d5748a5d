"""The run the functional tests share: 50 iterations of the tiny mHC GPT (TP=1, PP=2), the
golden run of test_pretrain.py whose TensorBoard logs test_plot_runs.py plots."""

import pytest

from tests.functional.pretrain_runs import GOLDEN_FLAGS, run_pretrain


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """(workdir, log, {iteration: loss}) of 50 iterations in one go."""
    workdir = tmp_path_factory.mktemp("golden_run")
    log, losses = run_pretrain(workdir, *GOLDEN_FLAGS)
    return workdir, log, losses
