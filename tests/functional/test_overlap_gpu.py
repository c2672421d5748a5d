"""The MLP's HC update node on the high-priority stream, under Megatron's EP all-to-all overlap:
pretrain_gpt_mhc.py with configs/gpt_tiny_moe_mhc.yaml and --overlap-moe-expert-parallel-comm
trains bitwise the same with and without --mhc-mlp-high-priority-stream, and with it the update
kernels of the MLP run on a stream of their own. Expert parallelism 2 is one NCCL rank per GPU,
so this runs on a machine with 2 CUDA GPUs (bench/gpu_suite.sh) and is skipped elsewhere."""

import gzip
import importlib.util
import json

import pytest
import torch

from tests.functional.pretrain_runs import run_pretrain

CONFIG = "configs/gpt_tiny_moe_mhc.yaml"
ITERATIONS = 10
# The local spec without the fusions that need Transformer Engine or apex (both optional), and
# the Triton kernels, whose names the profile shows.
OVERLAP_RUN = [
    "--train-iters",
    str(ITERATIONS),
    "--overlap-moe-expert-parallel-comm",
    "--transformer-impl",
    "local",
    "--no-gradient-accumulation-fusion",
    "--no-rope-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
    "--mhc-kernel-backend",
    "triton",
]
# Megatron's PyTorch profiler over iteration 3 on rank 0: a Chrome trace in
# <tensorboard dir>/../torch_profile/rank-0.json.gz.
PROFILE = [
    "--profile",
    "--use-pytorch-profiler",
    "--profile-step-start",
    "3",
    "--profile-step-end",
    "4",
    "--profile-ranks",
    "0",
]
UPDATE_KERNELS = ("update_fwd_kernel", "update_bwd_kernel")


def _streams_of_update_kernels(workdir) -> set:
    with gzip.open(workdir / "torch_profile" / "rank-0.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    return {
        event["args"]["stream"]
        for event in events
        if event.get("cat") == "kernel" and event["name"].startswith(UPDATE_KERNELS)
    }


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs (expert parallelism 2, one NCCL rank per GPU)",
)
def test_gpu_mlp_update_on_the_high_priority_stream_trains_bitwise_as_without_it(tmp_path):
    runs = {}
    for name, flags in [
        ("compute_stream", []),
        ("high_priority", ["--mhc-mlp-high-priority-stream"]),
    ]:
        (tmp_path / name).mkdir()
        _, runs[name] = run_pretrain(tmp_path / name, *OVERLAP_RUN, *PROFILE, *flags, config=CONFIG)
    assert sorted(runs["compute_stream"]) == list(range(1, ITERATIONS + 1))
    # Events order the update node against the nodes before and after it in both directions.
    assert runs["high_priority"] == runs["compute_stream"]
    # Without the option every update (the attention's and the MLP's) runs on the compute
    # stream; with it the MLP's moves to a second stream (the attention's stays).
    assert len(_streams_of_update_kernels(tmp_path / "compute_stream")) == 1
    assert len(_streams_of_update_kernels(tmp_path / "high_priority")) == 2


@pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("transformer_engine") is None,
    reason="needs 2 CUDA GPUs and Transformer Engine (megatron.training allows "
    "--delay-wgrad-compute only with its linears)",
)
def test_gpu_delay_wgrad_compute_trains_as_without_it(tmp_path):
    """Transformer Engine's linears compute their weight gradients later, in the node Megatron
    schedules for it; the HC parameters' gradients come in the normal backward either way."""
    te_run = [
        "--train-iters",
        str(ITERATIONS),
        "--overlap-moe-expert-parallel-comm",
        "--transformer-impl",
        "transformer_engine",
    ]
    runs = {}
    for name, flags in [("plain", []), ("delayed", ["--delay-wgrad-compute"])]:
        (tmp_path / name).mkdir()
        _, runs[name] = run_pretrain(tmp_path / name, *te_run, *flags, config=CONFIG)
    assert sorted(runs["plain"]) == list(range(1, ITERATIONS + 1))
    assert runs["delayed"] == runs["plain"]
