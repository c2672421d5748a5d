"""pretrain_gpt_mhc.py with multi-token prediction (`--mtp-num-layers 1`) on the tiny mHC config
(CPU, 2 gloo processes, PP=2: the MTP block on the last stage, untied embeddings): Megatron's
training log and TensorBoard carry the MTP loss, finite and falling, beside the falling lm loss,
and the run saves its checkpoint. The tiny mHC hybrid config with an MTP depth in its pattern
(`/*-`) trains the same way."""

import math
import re

from tests.functional.pretrain_runs import run_pretrain

ITERATIONS = 20
_MTP_LOSS = re.compile(r"iteration +(\d+)/ *\d+ \|.* mtp_1 loss: ([^ |]+) \|")


def _assert_mtp_and_lm_losses_logged_finite_and_falling(log, losses, iterations):
    """The MTP loss logged at every iteration, finite, and with the lm loss down by more than 1."""
    mtp = {int(i): float(v) for i, v in _MTP_LOSS.findall(log)}
    assert sorted(mtp) == sorted(losses) == list(range(1, iterations + 1))
    assert all(math.isfinite(v) for v in mtp.values())
    assert mtp[iterations] < mtp[1] - 1.0, mtp
    assert losses[iterations] < losses[1] - 1.0, losses


def test_mtp_loss_is_logged_finite_and_falling(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log, losses = run_pretrain(
        tmp_path,
        "--mtp-num-layers",
        "1",
        "--untie-embeddings-and-output-weights",
        "--train-iters",
        str(ITERATIONS),
    )
    _assert_mtp_and_lm_losses_logged_finite_and_falling(log, losses, ITERATIONS)
    # The health figures cover the decoder's four layers, not the MTP layer.
    assert "[mhc]   layer04: H_pre" in log and "layer05" not in log
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "mtp_1 loss" in events.Tags()["scalars"]


HYBRID_ITERATIONS = 12


def test_hybrid_mtp_part_trains_with_the_mtp_loss_logged(tmp_path):
    """megatron.training sets --mtp-num-layers 1 from the pattern's one `/` part."""
    log, losses = run_pretrain(
        tmp_path,
        "--hybrid-layer-pattern",
        "*-*E|*-*E/*-",
        "--untie-embeddings-and-output-weights",
        "--train-iters",
        str(HYBRID_ITERATIONS),
        config="configs/hybrid_tiny_mhc.yaml",
    )
    assert "building HybridModel *-*E|*-*E/*-" in log
    _assert_mtp_and_lm_losses_logged_finite_and_falling(log, losses, HYBRID_ITERATIONS)
    # The health figures cover the decoder's eight hybrid layers, not the MTP depth's.
    assert "[mhc]   layer08: H_pre" in log and "layer09" not in log
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
