"""pretrain_gpt_mhc.py end to end on CPU (2 gloo processes, the tiny mHC config): losses against
committed golden values, bit-exact resume from a checkpoint, and resume with another layout."""

import math
import os

import pytest

from tests.functional.pretrain_runs import load_golden, run_pretrain, write_golden


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """50 iterations in one go (TP=1, PP=2), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    log, losses = run_pretrain(workdir)
    return workdir, log, losses


def test_losses_match_golden_values(uninterrupted):
    workdir, log, losses = uninterrupted
    assert "megatron-mhc: no CUDA device" in log
    assert sorted(losses) == list(range(1, 51))
    assert all(math.isfinite(v) for v in losses.values())
    if os.environ.get("MHC_REGENERATE_GOLDEN") == "1":
        write_golden(losses)
    golden = load_golden()
    assert sorted(golden) == sorted(losses)
    for iteration, value in golden.items():
        assert losses[iteration] == pytest.approx(value, rel=1e-5), iteration
    assert losses[50] < losses[1] - 1.0  # it learns
    assert "[mhc]   layer04: H_pre" in log and "tokens/s:" in log


def test_tensorboard_has_loss_throughput_and_mhc_figures(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _, _ = uninterrupted
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "lm loss",
        "learning-rate",
        "grad-norm",
        "throughput/tokens_per_s",
        "mhc/h_pre_mean",
        "mhc/h_post_mean",
        "mhc/amax_gain_fwd",
        "mhc/amax_gain_bwd",
        "mhc/layer04/amax_gain_bwd",
    }
    assert expected <= tags, expected - tags
    gains = [e.value for e in events.Scalars("mhc/amax_gain_fwd")]
    assert len(gains) >= 49 and all(abs(g - 1.0) < 1e-3 for g in gains)


def test_resume_from_iteration_25_is_bitwise_the_uninterrupted_run(uninterrupted, tmp_path):
    _, _, full = uninterrupted
    run_pretrain(tmp_path, "--exit-interval", "25", "--save-interval", "25")
    log, resumed = run_pretrain(tmp_path)
    assert "loading distributed checkpoint" in log or "successfully loaded checkpoint" in log
    assert sorted(resumed) == list(range(26, 51))
    for iteration in range(26, 51):
        assert resumed[iteration] == full[iteration], iteration


def test_resume_with_another_parallel_layout(uninterrupted, tmp_path):
    """Saved with TP=1 PP=2, resumed with TP=2 PP=1 (torch_dist resharding)."""
    _, _, full = uninterrupted
    run_pretrain(tmp_path, "--exit-interval", "25", "--save-interval", "25")
    _, resumed = run_pretrain(
        tmp_path,
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "1",
    )
    assert sorted(resumed) == list(range(26, 51))
    for iteration in range(26, 51):
        # Same model, another reduction order: equal up to fp32 rounding.
        assert resumed[iteration] == pytest.approx(full[iteration], rel=1e-4), iteration


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--mhc-num-residual-streams", "0"],
            "MHCTransformerConfig.mhc_num_residual_streams=0 is invalid: must be an integer >= 1",
        ),
        (["--config", "BAD_YAML"], "unknown key model.num_layer; did you mean 'num_layers'?"),
    ],
)
def test_bad_input_stops_before_training_naming_the_field(tmp_path, flags, message):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  num_layer: 4\n")
    flags = [str(bad_yaml) if f == "BAD_YAML" else f for f in flags]
    with pytest.raises(RuntimeError) as failure:
        run_pretrain(tmp_path, *flags)
    log = str(failure.value)
    assert "pretrain_gpt_mhc.py: " in log and message in log
    assert "iteration" not in log and not (tmp_path / "checkpoints").exists()
