"""`pretrain_gpt_mhc.py --dry-run`: every config in configs/ would start on the GPU count its
header documents (`# gpus: N`), the sbatch launcher's default config on its default allocation;
planted errors are refused naming the flag; the activation estimate of the tiny config matches
the bytes bench/activation_memory.py measures."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_mhc.training import dry_run
from megatron_mhc.training.dry_run.memory import StageReport, estimate_memory
from tests.dist_utils import initialize_model_parallel, run_distributed

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "gpt_tiny_mhc.yaml"
SBATCH = REPO / "scripts" / "slurm" / "pretrain_gpt_mhc.sbatch"
MEMORY_LINE = re.compile(r"^memory per GPU: \d+\.\d\d GiB$", re.M)
# A config's own count of its parameters, as the dry run prints it ("parameters in all: ...").
DOCUMENTED_PARAMETERS = re.compile(r"^# parameters: (\d+\.\d+ [BM]) ", re.M)
# The configs after the mHC paper's models, named by their size in billions (mhc_moe_27b.yaml).
PAPER_CONFIG = re.compile(r"^mhc_.*_(\d+)b\.yaml$")


def documented_gpus(config: Path) -> int:
    """The `# gpus: N` of the config's header, else of its base file."""
    text = config.read_text()
    match = re.search(r"^# gpus: (\d+)", text, re.M)
    if match:
        return int(match.group(1))
    base = yaml.safe_load(text).get("base")
    assert base, f"{config.name}: no '# gpus: N' line in its header and no base file"
    return documented_gpus(config.parent / base)


def _dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = dry_run.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_would_start_on_the_gpus_its_header_documents(config, capsys):
    assert config.read_text().startswith("# gpus: "), "the README: every config's first line"
    gpus = documented_gpus(config)
    code, out, err = _dry_run(capsys, "--config", str(config), "--world-size", str(gpus))
    assert code == 0, err
    assert f"the launch would start on {gpus} GPUs" in out
    assert MEMORY_LINE.search(out), out
    assert re.search(r"^parameters in all: \d+\.\d+ [BM] ", out, re.M), out
    documented = DOCUMENTED_PARAMETERS.search(config.read_text())
    if documented:
        assert f"parameters in all: {documented.group(1)} " in out


@pytest.mark.parametrize(
    "config",
    [c for c in CONFIGS if PAPER_CONFIG.match(c.name)],
    ids=lambda c: c.name,
)
def test_paper_config_counts_the_parameters_of_its_name_within_5_percent(config):
    """Its documented count (which the test above compares with the dry run's)."""
    documented = DOCUMENTED_PARAMETERS.search(config.read_text())
    assert documented, f"{config.name}: no '# parameters: N B' line"
    count, unit = documented.group(1).split()
    named = int(PAPER_CONFIG.match(config.name).group(1))
    assert unit == "B" and abs(float(count) - named) <= 0.05 * named, (count, named)


def test_sbatch_default_config_would_start_on_the_default_allocation(capsys):
    script = SBATCH.read_text()
    config = re.search(r'^CONFIG="\$\{CONFIG:-(.+?)\}"', script, re.M).group(1)
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", script, re.M).group(1))
    tasks = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", script, re.M).group(1))
    code, out, err = _dry_run(
        capsys, "--config", str(REPO / config), "--world-size", str(nodes * tasks)
    )
    assert code == 0, err
    assert f"the launch would start on {nodes * tasks} GPUs" in out


@pytest.mark.parametrize(
    "planted,flag",
    [
        (["--num-attention-heads", "5"], "--num-attention-heads"),  # 5 does not divide 128
        (["--num-layers", "5"], "--num-layers"),  # 5 layers on 2 pipeline stages
    ],
    ids=["heads-vs-hidden", "layers-vs-pp"],
)
def test_planted_error_is_refused_naming_the_flag(planted, flag, capsys):
    code, out, err = _dry_run(capsys, "--config", str(TINY), "--world-size", "2", *planted)
    assert code != 0
    assert flag in err, err
    assert not MEMORY_LINE.search(out)


@pytest.mark.parametrize(
    "world_size,message",
    [
        ("abc", "argument --world-size: invalid int value: 'abc' (see pretrain_gpt_mhc.py --help)"),
        ("0", "--world-size 0: must be >= 1"),
    ],
)
def test_bad_world_size_is_one_error_line(world_size, message, capsys):
    code, out, err = _dry_run(capsys, "--config", str(TINY), "--world-size", world_size)
    assert code == 2 and out == ""
    assert err == f"pretrain_gpt_mhc.py: error: {message}\n"  # no usage block


def test_save_directory_that_cannot_be_created_is_refused_without_a_trace(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    save = tmp_path / "a_file" / "checkpoints"
    code, out, err = _dry_run(
        capsys, "--config", str(TINY), "--world-size", "2", "--save", str(save)
    )
    assert code == 2
    assert f"--save {save}: cannot be created, {tmp_path / 'a_file'} is a file" in err
    assert not MEMORY_LINE.search(out) and list(tmp_path.iterdir()) == [tmp_path / "a_file"]


def test_weights_and_optimizer_of_dense_baseline_equal_megatrons_formula():
    # bf16, distributed optimizer, no mHC, even pipeline: the case Megatron's formula covers.
    result = dry_run.dry_run(["--config", str(REPO / "configs" / "gpt_1p3b_baseline.yaml")], 8)
    memory = result.memory
    ours = memory.weights + memory.gradients + memory.optimizer_distributed
    assert ours == pytest.approx(result.megatron_weight_and_optimizer_bytes, rel=1e-6)


def _measured_saved_bytes(rank, world_size, dims: dict) -> int:
    """bench/activation_memory.py's count for the mHC model of `dims` without recompute: the
    bytes autograd keeps for backward after one forward of one micro-batch."""
    import torch

    sys.path.insert(0, str(REPO))
    from bench.activation_memory import build, measure

    initialize_model_parallel()
    bench_args = argparse.Namespace(**dims, dropout=0.0, warmup=0, repeats=1)
    model = build(bench_args, streams=4, recompute=None, device=torch.device("cpu"))
    saved_bytes, *_ = measure(bench_args, model, torch.device("cpu"))
    return saved_bytes


def test_activation_estimate_of_tiny_config_matches_bench_within_10_percent():
    # The local spec (unfused attention), as the tiny config runs on CPU where the bench counts.
    result = dry_run.dry_run(["--config", str(TINY), "--transformer-impl", "local"], 2)
    args = result.args
    assert args.mhc_num_residual_streams == 4 and args.mhc_recompute_layer_num is None
    estimate = sum(stage.activation_bytes_per_microbatch for stage in result.stages)
    dims = dict(
        layers=args.num_layers,
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        seq=args.seq_length,
        micro_batch=args.micro_batch_size,
        vocab=args.padded_vocab_size,
    )
    (measured,) = run_distributed(_measured_saved_bytes, 1, dims)
    assert abs(estimate - measured) <= 0.10 * measured, (estimate, measured)


def test_command_line_dry_run_exits_0_on_the_smallest_world_size():
    run = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_mhc.py"), "--config", str(TINY), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "the launch would start on 2 GPUs" in run.stdout  # TP=1 x PP=2
    assert MEMORY_LINE.search(run.stdout), run.stdout


def _gradient_dtypes_under_ddp(rank, world_size):
    from tests.tiny_gpt import MHC_4_STREAMS, build_tiny_gpt, megatron_training, tiny_config

    initialize_model_parallel()
    gpt = build_tiny_gpt(tiny_config(**MHC_4_STREAMS, bf16=True, pipeline_dtype=torch.bfloat16))
    model, _ = megatron_training(gpt, gpt.config, bf16=True)  # gradients reduced in bf16
    return {name: param.main_grad.dtype for name, param in model.named_parameters()}


def test_gradient_bytes_count_the_hc_gradients_in_fp32():
    """Megatron's gradient buffers take their parameter's dtype unless told fp32: the HC
    gradients are fp32 in a bf16 model whose other gradients are bf16, and the estimate counts
    them so."""
    (dtypes,) = run_distributed(_gradient_dtypes_under_ddp, 1)
    assert {d for n, d in dtypes.items() if "hyper_connection" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "hyper_connection" not in n} == {torch.bfloat16}
    args = argparse.Namespace(
        bf16=True,
        fp16=False,
        data_parallel_size=1,
        expert_tensor_parallel_size=1,
        tensor_model_parallel_size=1,
        world_size=1,
        expert_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        optimizer="adam",
        accumulate_allreduce_grads_in_fp32=False,
    )
    stage = StageReport(0, 4, 1000, 100, 0, 1000, 100, None, 0.0, 0.0, 1.0)
    assert estimate_memory(args, [stage]).gradients == 2 * 900 + 4 * 100
