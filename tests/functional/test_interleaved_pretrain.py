"""pretrain_gpt_mhc.py with an interleaved pipeline (PP=2 x VPP=2, no variable_seq_lengths)
trains as the non-interleaved PP=2 run does."""

import pytest

from tests.functional.pretrain_runs import run_pretrain

ITERATIONS = ["--train-iters", "6"]


def test_interleaved_pipeline_run_matches_the_non_interleaved_run(tmp_path):
    """Both from the same weights: each layout initialises its layers in its own order, so the
    interleaved run resumes from the plain run's checkpoint after one iteration."""
    _, plain = run_pretrain(tmp_path / "plain", *ITERATIONS)
    run_pretrain(
        tmp_path / "interleaved", *ITERATIONS, "--exit-interval", "1", "--save-interval", "1"
    )
    _, interleaved = run_pretrain(
        tmp_path / "interleaved", *ITERATIONS, "--num-layers-per-virtual-pipeline-stage", "1"
    )
    assert sorted(interleaved) == list(range(2, 7))
    for iteration in range(2, 7):
        assert interleaved[iteration] == pytest.approx(plain[iteration], rel=1e-5), iteration
