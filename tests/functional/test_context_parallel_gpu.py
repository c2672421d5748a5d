"""Context parallelism with mHC: pretrain_gpt_mhc.py with CP=2 trains the tiny mHC GPT as CP=1 with
two data-parallel replicas does. Megatron's context parallelism is Transformer Engine attention,
so this runs on a machine with 2 CUDA GPUs and Transformer Engine (bench/gpu_suite.sh) and is
skipped elsewhere."""

import importlib.util

import pytest
import torch

from tests.functional.pretrain_runs import run_pretrain

ITERATIONS = 10
# TE's flash and fused attention, the ones that implement context parallelism, compute in bf16.
TE_BF16_RUN = [
    "--train-iters",
    str(ITERATIONS),
    "--pipeline-model-parallel-size",
    "1",
    "--transformer-impl",
    "transformer_engine",
    "--bf16",
]


@pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("transformer_engine") is None,
    reason="needs 2 CUDA GPUs (one NCCL rank per GPU) and Transformer Engine (context "
    "parallelism is TE attention)",
)
def test_gpu_context_parallel_2_trains_as_cp1_dp2(tmp_path, monkeypatch):
    # megatron.training requires it for context parallelism on GPUs older than Blackwell.
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    (tmp_path / "cp2").mkdir()
    (tmp_path / "cp1_dp2").mkdir()
    _, context_parallel = run_pretrain(
        tmp_path / "cp2", *TE_BF16_RUN, "--context-parallel-size", "2"
    )
    _, data_parallel = run_pretrain(
        tmp_path / "cp1_dp2", *TE_BF16_RUN, "--context-parallel-size", "1"
    )
    assert sorted(context_parallel) == sorted(data_parallel) == list(range(1, ITERATIONS + 1))
    for iteration, loss in data_parallel.items():
        # bf16 activations (unit roundoff 2^-8) and another attention partitioning: the losses,
        # means over 8 x 128 tokens, agree to well within a percent.
        assert context_parallel[iteration] == pytest.approx(loss, rel=1e-2), iteration
