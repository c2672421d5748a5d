"""A run keeps its whole training state across a restart: pretrain_gpt_mhc.py (torchrun, 2 gloo
processes, the tiny mHC GPT at DP=2) saved at iteration 3 and resumed to 6 gives bitwise the
losses of the uninterrupted 6-iteration run, and its iteration-6 checkpoint holds bitwise the
same model weights, fp32 main weights, Adam moments and step, in bf16 and fp32, with and without
the distributed optimizer, in both checkpoint formats (megatron_mhc/optimizer_patches.py makes
the optimizer state of the fp32 HC parameters checkpointable). The distributed optimizer's
state is compared in the fully reshardable layout: the default (dp-reshardable) one saves its
flat buffers with the padding between parameters uninitialized (`torch.empty`), bytes that
differ from run to run and that no parameter reads; that layout is resumed by the killed-save
test below (losses and weights bitwise) and loaded at another data-parallel size.

Also: --no-load-optim starts Adam afresh but keeps the learning-rate schedule (a negative control
of the comparison: the moments differ); a rank killed in the middle of a distributed-optimizer
save leaves the previous checkpoint to resume from, bit-exact; a distributed-optimizer
checkpoint saved at DP=2 loads at DP=1 (the default, dp-reshardable format) and one saved
--dist-ckpt-optim-fully-reshardable loads at PP=2, both training on as the unresharded run does.
fp16 runs only on a GPU (its loss scaler is CUDA-only; bench/gpu_suite.sh runs its case).
"""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.functional.checkpoint_state import differences, optimizer_paths, training_state
from tests.functional.pretrain_runs import run_pretrain

DP2 = ["--pipeline-model-parallel-size", "1"]
# Sequences of 32 tokens: bf16 matrix products are slow on CPU, and the state is the same size.
SIX_ITERATIONS = [
    *DP2,
    "--seq-length",
    "32",
    "--train-iters",
    "6",
    "--lr-warmup-iters",
    "2",
    "--save-interval",
    "3",
]
DISTRIBUTED = ["--use-distributed-optimizer"]
FULLY_RESHARDABLE = [*DISTRIBUTED, "--dist-ckpt-optim-fully-reshardable"]
TORCH_FORMAT = ["--ckpt-format", "torch"]
VARIANTS = {
    "bf16": ["--bf16"],
    "bf16-torch-format": ["--bf16", *TORCH_FORMAT],
    "bf16-distributed": ["--bf16", *FULLY_RESHARDABLE],
    "bf16-distributed-torch-format": ["--bf16", *DISTRIBUTED, *TORCH_FORMAT],
    "fp32-distributed": FULLY_RESHARDABLE,
}
# fp32 with the non-distributed optimizer: tests/functional/test_pretrain.py's resume test.
ON_GPU = {"fp16-distributed": ["--fp16", *DISTRIBUTED]}
_LR = re.compile(r"iteration +(\d+)/ +\d+ \|.*?learning rate: ([0-9.E+-]+)")


def _iteration(checkpoints: Path, iteration: int) -> Path:
    return checkpoints / f"iter_{iteration:07d}"


def _resumable_copy(checkpoints: Path, workdir: Path, iteration: int = 3) -> Path:
    """workdir/checkpoints holding only `iteration` of `checkpoints` (hard links), as a run that
    stopped there leaves it."""
    target = workdir / "checkpoints"
    shutil.copytree(
        _iteration(checkpoints, iteration), _iteration(target, iteration), copy_function=os.link
    )
    (target / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return workdir


class Run:
    """One launch: its workdir, log, losses and learning rates by iteration."""

    def __init__(self, workdir: Path, *flags: str, nproc: int = 2, env: dict | None = None):
        self.workdir = workdir
        self.log, self.losses = run_pretrain(workdir, *flags, nproc=nproc, env=env)
        self.lr = {int(i): float(v) for i, v in _LR.findall(self.log)}

    def state(self, iteration: int = 6) -> dict:
        return training_state(_iteration(self.workdir / "checkpoints", iteration))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each variant's uninterrupted 6-iteration run (saving at 3 and 6), made once."""
    runs = {}

    def get(variant: str) -> Run:
        if variant not in runs:
            workdir = tmp_path_factory.mktemp(f"uninterrupted-{variant}")
            runs[variant] = Run(workdir, *SIX_ITERATIONS, *{**VARIANTS, **ON_GPU}[variant])
        return runs[variant]

    return get


def _assert_same_training_state(resumed: Run, full: Run) -> None:
    assert sorted(resumed.losses) == [4, 5, 6]
    for iteration in (4, 5, 6):
        assert resumed.losses[iteration] == full.losses[iteration], iteration
    expected, got = full.state(), resumed.state()
    # What the comparison covers: Adam's moments and step, and the fp32 HC weights.
    moments = optimizer_paths(expected, "exp_avg", "exp_avg_sq")
    assert moments and all(torch.count_nonzero(expected[p]) for p in moments), moments
    assert any(p.endswith("step") for p in expected)
    assert any("hyper_connection.fn" in p and expected[p].dtype == torch.float32 for p in expected)
    assert differences(expected, got) == []


def _resume(variant: str, full: Run, tmp_path: Path, *flags: str) -> Run:
    workdir = _resumable_copy(full.workdir / "checkpoints", tmp_path)
    return Run(workdir, *SIX_ITERATIONS, *VARIANTS.get(variant, ON_GPU.get(variant)), *flags)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_from_iteration_3_keeps_every_weight_moment_and_step_bitwise(
    variant, uninterrupted, tmp_path
):
    full = uninterrupted(variant)
    _assert_same_training_state(_resume(variant, full, tmp_path), full)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fp16 needs CUDA; DP=2 needs 2 GPUs")
@pytest.mark.parametrize("variant", list(ON_GPU))
def test_gpu_fp16_resume_keeps_every_weight_moment_and_step_bitwise(
    variant, uninterrupted, tmp_path
):
    full = uninterrupted(variant)
    _assert_same_training_state(_resume(variant, full, tmp_path), full)


def test_no_load_optim_starts_adam_afresh_on_the_same_learning_rate_schedule(
    uninterrupted, tmp_path
):
    """The negative control of the comparison above: without the optimizer state the moments
    differ, while megatron-mhc keeps the schedule (megatron-core 0.19.2 would restart it)."""
    full = uninterrupted("bf16")
    fresh = _resume("bf16", full, tmp_path, "--no-load-optim")
    assert "without its optimizer state" in fresh.log
    assert fresh.lr == {i: full.lr[i] for i in (4, 5, 6)}
    assert fresh.losses[4] == full.losses[4]  # the weights were loaded
    changed = differences(full.state(), fresh.state())
    moments = optimizer_paths(full.state(), "exp_avg", "exp_avg_sq")
    assert moments and set(moments) <= set(changed)


@pytest.fixture(scope="module")
def killed_and_relaunched(tmp_path_factory):
    """A run in the distributed optimizer's default (dp-reshardable) format whose rank 0 was
    SIGKILLed in its second save (iteration 6), after the data files and before the index and
    the tracker (tests/functional/killed_mid_save), then relaunched on the same directory:
    (the killed launch's error, the tracker it left, whether iteration 6 had an index, the
    relaunch)."""
    workdir = tmp_path_factory.mktemp("killed_mid_save")
    pythonpath = [str(Path(__file__).parent / "killed_mid_save"), os.environ.get("PYTHONPATH")]
    killer = {"PYTHONPATH": os.pathsep.join(filter(None, pythonpath)), "MHC_TEST_KILL_AT_SAVE": "2"}
    flags = [*SIX_ITERATIONS, "--bf16", *DISTRIBUTED]
    with pytest.raises(RuntimeError) as killed:
        Run(workdir, *flags, env=killer)
    checkpoints = workdir / "checkpoints"
    tracker = (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    indexed = (_iteration(checkpoints, 6) / ".metadata").exists()
    return str(killed.value), tracker, indexed, Run(workdir, *flags)


def test_rank_killed_mid_save_resumes_from_the_last_complete_checkpoint_bitwise(
    killed_and_relaunched, uninterrupted
):
    error, tracker, indexed, relaunched = killed_and_relaunched
    assert re.search(r"exitcode *: -9", error), error[-2000:]
    assert tracker == "3" and not indexed  # the save of iteration 6 was cut short
    assert "at iteration 3" in relaunched.log
    full = uninterrupted("bf16-distributed")
    assert {i: relaunched.losses[i] for i in (4, 5, 6)} == {i: full.losses[i] for i in (4, 5, 6)}
    # The uninterrupted run saved its optimizer state in the fully reshardable layout: the
    # model weights (the fp32 HC parameters among them) are what both checkpoints share.
    weights = {p: v for p, v in full.state().items() if torch.is_tensor(v) and "optimizer" not in p}
    got = relaunched.state()
    assert any("hyper_connection" in p for p in weights)
    assert [p for p, v in weights.items() if not torch.equal(v, got[p])] == []


@pytest.mark.parametrize(
    ("layout", "nproc"),
    [(["--pipeline-model-parallel-size", "1"], 1), (["--pipeline-model-parallel-size", "2"], 2)],
    ids=["dp-reshardable-dp2-to-dp1", "fully-reshardable-dp2-to-pp2"],
)
def test_distributed_optimizer_checkpoint_loads_in_another_layout_and_trains_on(
    layout, nproc, uninterrupted, killed_and_relaunched, tmp_path
):
    """The default format allows another data-parallel size only; the fully reshardable one any
    layout. Within 1e-3 of the unresharded run (other reduction orders)."""
    full = uninterrupted("bf16-distributed")
    dp_reshardable = killed_and_relaunched[-1].workdir / "checkpoints"
    source = dp_reshardable if nproc == 1 else full.workdir / "checkpoints"
    resharded = Run(
        _resumable_copy(source, tmp_path),
        *SIX_ITERATIONS,
        "--bf16",
        *DISTRIBUTED,
        *layout,
        nproc=nproc,
    )
    assert "at iteration 3" in resharded.log
    for iteration in (4, 5, 6):
        assert resharded.losses[iteration] == pytest.approx(full.losses[iteration], abs=1e-3)
