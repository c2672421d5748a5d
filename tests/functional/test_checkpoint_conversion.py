"""Checkpoints across versions, end to end: a checkpoint written before the HC modules took
Megatron's slot names converts and resumes with the losses the old code had (loading it
unconverted is refused at launch with the conversion command: tests/unit/test_launch_errors.py);
a round trip through Megatron-LM main's names resumes the same."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.pretrain_runs import REPO, file_digests, run_pretrain

LEGACY = Path(__file__).resolve().parent / "legacy" / "gpt_tiny_mhc_before_hc_rename"
LEGACY_LOSSES = {
    int(i): v for i, v in json.loads(LEGACY.with_suffix(".json").read_text())["lm_loss"].items()
}
# The model of the legacy checkpoint (the rest is configs/gpt_tiny_mhc.yaml).
FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--ffn-hidden-size",
    "64",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "32",
    "--max-position-embeddings",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr-warmup-iters",
    "1",
    "--train-iters",
    "4",
]


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_upgraded_legacy_checkpoint_resumes_with_the_old_codes_losses(tmp_path):
    converted = _convert("upgrade", str(LEGACY), str(tmp_path / "checkpoints"))
    assert converted.returncode == 0, converted.stderr
    _, losses = run_pretrain(tmp_path, *FLAGS)
    assert sorted(losses) == [3, 4]
    for iteration, value in LEGACY_LOSSES.items():
        assert losses[iteration] == pytest.approx(value, rel=1e-5), iteration


def test_round_trip_through_megatron_main_resumes_the_same(tmp_path):
    """Written for Megatron-LM main and back (torch_dist both ways, weights and Adam moments);
    the sources stay byte-identical."""
    source = file_digests(LEGACY)
    main = tmp_path / "megatron_main"
    for args in (
        ("to-megatron-main", str(LEGACY), str(main)),
        ("from-megatron-main", str(main), str(tmp_path / "checkpoints")),
    ):
        converted = _convert(*args, "--num-residual-streams", "4")
        assert converted.returncode == 0, converted.stderr
    main_digests = file_digests(main)
    _, losses = run_pretrain(tmp_path, *FLAGS)
    for iteration, value in LEGACY_LOSSES.items():
        assert losses[iteration] == pytest.approx(value, rel=1e-5), iteration
    assert file_digests(LEGACY) == source and file_digests(main) == main_digests


def test_conversion_refuses_an_existing_destination_and_a_missing_stream_count(tmp_path):
    refused = _convert("upgrade", str(LEGACY), str(tmp_path))
    assert refused.returncode == 2 and "exists already" in refused.stderr
    refused = _convert("to-megatron-main", str(LEGACY), str(tmp_path / "new"))
    assert refused.returncode == 2 and "--num-residual-streams" in refused.stderr
    assert not (tmp_path / "new").exists()
