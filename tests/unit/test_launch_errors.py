"""Bad launches of pretrain_gpt_mhc.py are refused before anything is set up or written, each
with one line naming the flag, its value and what is allowed.

Every case runs the launch's own checks in-process (`parse_and_check_arguments`, with the
argument vector and WORLD_SIZE of a 2-process torchrun launch of configs/gpt_tiny_mhc.yaml) and
checks the message and that the run directory (checkpoints, TensorBoard) is left as it was.
`CASES` is also the table of docs/errors.md: `python -m tests.unit.test_launch_errors` prints
the table's rows with today's messages, and a test checks the document lists every case.
"""

import dataclasses
import io
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from megatron.training.global_vars import unset_global_variables

from megatron_mhc.checkpoint_conversion import upgrade_checkpoint
from megatron_mhc.platform.cpu import CPU_MEGATRON_ARGS
from megatron_mhc.training import launch_checks
from megatron_mhc.training.launch_checks import (
    launch_error_line,
    launch_errors_reported,
    parse_and_check_arguments,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "gpt_tiny_mhc.yaml"
ERRORS_DOC = REPO / "docs" / "errors.md"
# A torch_dist checkpoint written by a real run of the tiny mHC GPT (2 processes, iteration 2).
REAL_CHECKPOINT = REPO / "tests" / "functional" / "legacy" / "gpt_tiny_mhc_before_hc_rename"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    flags: tuple[str, ...]
    message: str
    """A fragment of the one-line error the launch gets."""
    setup: Callable[[Path], None] | None = None
    """Writes the files the case needs into the run directory (`{run}` in flags)."""


def _empty_dataset(run: Path) -> None:
    (run / "corpus_text_document.bin").write_bytes(b"")
    (run / "corpus_text_document.idx").write_bytes(b"")


def _yaml_without_data(run: Path) -> None:
    (run / "no_data.yaml").write_text(f"base: {CONFIG}\ndata:\n  default_corpus: false\n")


def _yaml_with_typo(run: Path) -> None:
    (run / "typo.yaml").write_text(f"base: {CONFIG}\nmodel:\n  num_layer: 4\n")


def _empty_yaml(run: Path) -> None:
    (run / "empty.yaml").write_text("# nothing yet\n")


def _a_file(run: Path) -> None:
    (run / "a_file").write_text("not a directory")


def _finished_run_checkpoint(run: Path) -> None:
    """The real checkpoint, of a run trained with another schedule (4 iterations of global
    batch 4), with today's HC names."""
    upgrade_checkpoint(REAL_CHECKPOINT, run / "checkpoints")


def _tracker(text: str) -> Callable[[Path], None]:
    def write(run: Path) -> None:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(text)

    return write


def _load_is_a_file(run: Path) -> None:
    (run / "checkpoints").write_text("not a directory")


def _real_checkpoint(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """The real checkpoint at iteration 2 and a copy of it as iteration 4 (the latest), whose
    copy `damage` damages."""

    def write(run: Path) -> None:
        checkpoints = run / "checkpoints"
        shutil.copytree(REAL_CHECKPOINT, checkpoints)
        shutil.copytree(checkpoints / "iter_0000002", checkpoints / "iter_0000004")
        (checkpoints / "latest_checkpointed_iteration.txt").write_text("4")
        damage(checkpoints / "iter_0000004")

    return write


def _truncate(name: str, keep: int) -> Callable[[Path], None]:
    def damage(iteration_dir: Path) -> None:
        path = iteration_dir / name
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def _remove(name: str) -> Callable[[Path], None]:
    return lambda iteration_dir: (iteration_dir / name).unlink()


def _without_optimizer_state(iteration_dir: Path) -> None:
    """The index of a run saved with --no-save-optim: no optimizer entry."""
    index_file = iteration_dir / ".metadata"
    index = pickle.loads(index_file.read_bytes())
    index.state_dict_metadata = {
        k: v for k, v in index.state_dict_metadata.items() if not k.startswith("optimizer.")
    }
    index.storage_data = {
        k: v for k, v in index.storage_data.items() if not k.fqn.startswith("optimizer.")
    }
    index_file.write_bytes(pickle.dumps(index))


def _torch_format_distributed_optimizer_checkpoints(run: Path) -> None:
    """Iterations 3 and 5 in the torch format with the distributed optimizer's state file, the
    tracker at 5."""
    for iteration in (3, 5):
        rank_dir = run / "checkpoints" / f"iter_{iteration:07d}" / "mp_rank_00_000"
        rank_dir.mkdir(parents=True)
        (rank_dir / "distrib_optim.pt").write_bytes(b"")
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("5")


CASES = [
    # Model shape and parallel layout.
    Case(
        "heads vs hidden size",
        ("--num-attention-heads", "5"),
        "--num-attention-heads 5 does not divide --hidden-size 128: each head gets hidden_size "
        "/ heads channels, so the heads must be one of 1, 2, 4, 8, 16, 32, 64, 128",
    ),
    Case("hidden size zero", ("--hidden-size", "0"), "--hidden-size 0: must be a positive integer"),
    Case(
        "query groups vs heads",
        ("--group-query-attention", "--num-query-groups", "3"),
        "--num-query-groups 3 does not divide --num-attention-heads 4: allowed 1, 2, 4",
    ),
    Case(
        "TP vs heads",
        ("--tensor-model-parallel-size", "3"),
        "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4",
    ),
    Case(
        "processes vs TP x PP",
        ("--pipeline-model-parallel-size", "4"),
        "2 processes (WORLD_SIZE, e.g. torchrun --nproc-per-node) cannot be split into groups of "
        "--tensor-model-parallel-size 1 x --pipeline-model-parallel-size 4 x "
        "--context-parallel-size 1 = 4",
    ),
    Case(
        "layers vs PP",
        ("--num-layers", "5"),
        "--pipeline-model-parallel-size 2 does not divide --num-layers 5: every stage holds the "
        "same number of layers, so PP must be one of 1, 5",
    ),
    Case(
        "layers per virtual stage vs layers per stage",
        ("--num-layers-per-virtual-pipeline-stage", "3"),
        "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers of each pipeline "
        "stage",
    ),
    Case(
        "virtual stages vs layers per stage",
        ("--num-virtual-stages-per-pipeline-rank", "3"),
        "--num-virtual-stages-per-pipeline-rank 3 does not divide the 2 layers of each pipeline "
        "stage",
    ),
    Case(
        "virtual stages with PP 2, no P2P overlap",
        ("--num-virtual-stages-per-pipeline-rank", "2", "--no-overlap-p2p-communication"),
        "the interleaved schedule needs PP >= 3 without P2P overlap",
    ),
    Case(
        "EP without experts",
        ("--expert-model-parallel-size", "2"),
        "--expert-model-parallel-size 2 needs a mixture-of-experts model (--num-experts)",
    ),
    Case(
        "EP vs experts",
        ("--num-experts", "3", "--expert-model-parallel-size", "2"),
        "--expert-model-parallel-size 2 does not divide --num-experts 3: allowed 1, 3",
    ),
    Case(
        "EP all-to-all overlap on a dense model",
        ("--overlap-moe-expert-parallel-comm",),
        "--overlap-moe-expert-parallel-comm overlaps the expert-parallel all-to-all of a "
        "mixture-of-experts model with computation, and this model has no experts",
    ),
    Case("bf16 and fp16", ("--bf16", "--fp16"), "--bf16 and --fp16: give one of them"),
    Case(
        "sequence vs position embeddings",
        ("--seq-length", "256"),
        "--seq-length 256 is longer than --max-position-embeddings 128",
    ),
    Case(
        "sequence vs context parallel",
        (
            "--context-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "1",
            "--seq-length",
            "126",
        ),
        "--seq-length 126 with --context-parallel-size 2: the sequence length must be a multiple "
        "of 2 x CP = 4",
    ),
    # Batch sizes and schedule.
    Case(
        "micro-batch zero", ("--micro-batch-size", "0"), "--micro-batch-size 0: must be a positive"
    ),
    Case(
        "global batch vs micro-batch x DP",
        ("--global-batch-size", "6"),
        "--global-batch-size 6 is not a multiple of --micro-batch-size 4 x data-parallel size 1",
    ),
    Case(
        "global batch zero",
        ("--global-batch-size", "0"),
        "--global-batch-size 0: must be a positive integer",
    ),
    Case(
        "warm-up vs train iterations",
        ("--train-iters", "20", "--lr-warmup-iters", "20"),
        "--lr-warmup-iters 20 is not below the decay length (--train-iters 20): the warm-up must "
        "end before the decay does; allowed 0 .. 19",
    ),
    Case(
        "warm-up vs decay iterations",
        ("--lr-decay-iters", "10", "--lr-warmup-iters", "10"),
        "--lr-warmup-iters 10 is not below the decay length (--lr-decay-iters 10)",
    ),
    Case(
        "warm-up fraction",
        ("--lr-warmup-fraction", "1.5", "--lr-warmup-iters", "0"),
        "--lr-warmup-fraction 1.5: must be in [0, 1)",
    ),
    Case(
        "iterations and samples",
        ("--train-samples", "1000"),
        "--train-iters 300 and --train-samples 1000: give one of them",
    ),
    Case("zero iterations", ("--train-iters", "0"), "--train-iters 0: must be a positive integer"),
    Case("negative learning rate", ("--lr", "-1"), "--lr -1.0: must be positive"),
    Case(
        "min-lr above lr",
        ("--min-lr", "0.1"),
        "--min-lr 0.1 is above --lr 0.003: the decay ends at --min-lr",
    ),
    Case(
        "learning-rate schedule of a finished run changed",
        (),
        "--load {run}/checkpoints: this launch's learning-rate schedule differs from the one the "
        "checkpoint of iteration 2 was trained with (warm-up: 160 here, 4 in the checkpoint; "
        "decay length: 2400 here, 16 in the checkpoint; ",
        _finished_run_checkpoint,
    ),
    Case(
        "save without interval",
        ("--save-interval", "0"),
        "needs --save-interval N (N > 0 iterations between checkpoints), got 0",
    ),
    # Output directories.
    Case(
        "save under a file",
        ("--save", "{run}/a_file/checkpoints"),
        "--save {run}/a_file/checkpoints: cannot be created, {run}/a_file is a file, not a "
        "directory",
        _a_file,
    ),
    Case(
        "TensorBoard directory is a file",
        ("--tensorboard-dir", "{run}/a_file"),
        "--tensorboard-dir {run}/a_file: is a file, expected a directory",
        _a_file,
    ),
    # Data and tokenizer.
    Case(
        "data path missing",
        ("--data-path", "{run}/missing_text_document"),
        "missing_text_document: expected a Megatron indexed dataset",
    ),
    Case(
        "data path empty",
        ("--data-path", "{run}/corpus_text_document"),
        "corpus_text_document.bin is empty (0 bytes)",
        _empty_dataset,
    ),
    Case(
        "data path with extension",
        ("--data-path", "{run}/corpus_text_document.bin"),
        "give the prefix without the extension",
        _empty_dataset,
    ),
    Case(
        "two data sources",
        ("--mock-data", "--data-path", "{run}/corpus_text_document"),
        "--mock-data and --data-path: give one data source",
        _empty_dataset,
    ),
    Case(
        "no data source",
        ("--config", "{run}/no_data.yaml"),
        "no training data: give --data-path PREFIX",
        _yaml_without_data,
    ),
    Case(
        "tokenizer vocabulary not given",
        ("--tokenizer-type", "GPT2BPETokenizer"),
        "--tokenizer-type GPT2BPETokenizer needs --vocab-file",
    ),
    Case(
        "tokenizer vocabulary missing",
        (
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            "{run}/vocab.json",
            "--merge-file",
            "{run}/merges.txt",
        ),
        "vocab.json: does not exist, expected the tokenizer's vocabulary file",
    ),
    Case(
        "tokenizer directory missing",
        ("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{run}/tokenizer"),
        "tokenizer: does not exist, expected a directory with the tokenizer's files",
    ),
    # Checkpoint to resume from.
    Case(
        "--load is a file",
        (),
        "checkpoints: is a file, expected a checkpoint directory",
        _load_is_a_file,
    ),
    Case(
        "tracker unreadable",
        (),
        "latest_checkpointed_iteration.txt holds 'garbage', expected the iteration to resume from",
        _tracker("garbage"),
    ),
    Case(
        "tracker names a missing iteration",
        (),
        "latest_checkpointed_iteration.txt names iteration 7, but",
        _tracker("7"),
    ),
    Case(
        "--ckpt-step names a missing iteration",
        ("--ckpt-step", "3"),
        "--ckpt-step 3 names iteration 3, but",
        _real_checkpoint(lambda iteration_dir: None),
    ),
    Case(
        "checkpoint data file truncated",
        (),
        "the checkpoint of iteration 4 is damaged: {run}/checkpoints/iter_0000004/__1_0.distcp "
        "is truncated: 1000 bytes, the index needs",
        _real_checkpoint(_truncate("__1_0.distcp", 1000)),
    ),
    Case(
        "checkpoint index truncated",
        (),
        "iter_0000004/.metadata cannot be read",
        _real_checkpoint(_truncate(".metadata", 100)),
    ),
    Case(
        "checkpoint data file missing",
        (),
        "iter_0000004/__0_0.distcp is missing (the index points into it). To resume from the "
        "previous checkpoint, iteration 2: add --ckpt-step 2 (this run only), or write 2 into",
        _real_checkpoint(_remove("__0_0.distcp")),
    ),
    Case(
        "checkpoint saved without optimizer state",
        (),
        "the checkpoint of iteration 4 holds no optimizer state (it was saved with "
        "--no-save-optim); add --no-load-optim to resume it",
        _real_checkpoint(_without_optimizer_state),
    ),
    Case(
        "--ckpt-step and the distributed optimizer in the torch format",
        ("--ckpt-step", "3", "--ckpt-format", "torch", "--use-distributed-optimizer"),
        "megatron-core would load the weights of iteration 3 with the optimizer state of the "
        "iteration in",
        _torch_format_distributed_optimizer_checkpoints,
    ),
    Case(
        "checkpoint with the HC names before 0.2",
        (),
        "the checkpoint uses the HC module names of megatron-mhc before 0.2 (",
        lambda run: shutil.copytree(REAL_CHECKPOINT, run / "checkpoints"),
    ),
    # Command line, config files and mHC settings.
    Case(
        "value outside a flag's choices",
        ("--mhc-type", "foo"),
        "argument --mhc-type: invalid choice: 'foo' (choose from 'mhc', 'hc', 'hc_static') "
        "(see pretrain_gpt_mhc.py --help)",
    ),
    Case(
        "value of the wrong type",
        ("--mhc-recompute-layer-num", "banana"),
        "argument --mhc-recompute-layer-num: 'banana' is neither an integer nor one of ['auto'] "
        "(see pretrain_gpt_mhc.py --help)",
    ),
    Case(
        "unknown flag",
        ("--num-layer", "4"),
        "unrecognized arguments: --num-layer 4 (see pretrain_gpt_mhc.py --help)",
    ),
    Case(
        "YAML key mistyped",
        ("--config", "{run}/typo.yaml"),
        "unknown key model.num_layer; did you mean 'num_layers'?",
        _yaml_with_typo,
    ),
    Case(
        "YAML file empty",
        ("--config", "{run}/empty.yaml"),
        "{run}/empty.yaml: the config file is empty",
        _empty_yaml,
    ),
    Case(
        "mHC streams zero",
        ("--mhc-num-residual-streams", "0"),
        "--mhc-num-residual-streams 0 is invalid: must be an integer >= 1",
    ),
    Case(
        "mHC Sinkhorn iterations zero",
        ("--mhc-sinkhorn-iterations", "0"),
        "--mhc-sinkhorn-iterations 0 is invalid: must be an integer >= 1",
    ),
    Case(
        "hybrid pattern the local spec cannot build",
        (
            "--config",
            "{repo}/configs/hybrid_tiny_mhc.yaml",
            "--hybrid-layer-pattern",
            "*M*E|*-*E",
        ),
        "--hybrid-layer-pattern '*M*E|*-*E': layer types 'M' Mamba need --transformer-impl "
        "transformer_engine and their CUDA packages; the local spec (--transformer-impl local) "
        "builds '*' attention, '+' multi-latent attention, '-' MLP, 'E' MoE",
    ),
    Case(
        "hybrid pattern with an unknown symbol",
        ("--config", "{repo}/configs/hybrid_tiny_mhc.yaml", "--hybrid-layer-pattern", "*-X-"),
        "--hybrid-layer-pattern '*-X-': 'X': no layer type has that symbol; the local spec",
    ),
    Case(
        "fused kernels without a GPU",
        ("--mhc-kernel-backend", "triton"),
        "mhc_kernel_backend='triton' cannot run here",
    ),
    Case(
        "fp16 without a GPU",
        ("--fp16",),
        "--fp16 needs a CUDA device: megatron-core's fp16 loss scaler",
    ),
    Case(
        "MTP with PP and tied embeddings",
        ("--mtp-num-layers", "1"),
        "mtp_num_layers=1 with pipeline_model_parallel_size=2 needs "
        "--untie-embeddings-and-output-weights",
    ),
]

GPU_ONLY_REFUSALS = {"fused kernels without a GPU", "fp16 without a GPU"}


def _argv(run: Path, flags) -> list[str]:
    return [
        "pretrain_gpt_mhc.py",
        *CPU_MEGATRON_ARGS,
        "--config",
        str(CONFIG),
        "--save",
        f"{run}/checkpoints",
        "--load",
        f"{run}/checkpoints",
        "--tensorboard-dir",
        f"{run}/tensorboard",
        *(flag.replace("{run}", str(run)).replace("{repo}", str(REPO)) for flag in flags),
    ]


def _snapshot(directory: Path) -> dict:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture
def two_process_launch(monkeypatch):
    """The environment of rank 0 of a 2-process torchrun launch; Megatron's globals unset
    afterwards should a launch get that far."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MHC_TRACEBACK", raising=False)
    yield monkeypatch
    unset_global_variables()


def _refusal(case: Case, run: Path, monkeypatch) -> str:
    if case.setup is not None:
        case.setup(run)
    before = _snapshot(run)
    monkeypatch.setattr(sys, "argv", _argv(run, case.flags))
    with pytest.raises((ValueError, AssertionError)) as refused:
        parse_and_check_arguments()
    assert _snapshot(run) == before, "a refused launch wrote into its run directory"
    return launch_error_line(refused.value)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_launch_is_refused_in_one_line_before_writing_anything(
    case, tmp_path, two_process_launch
):
    if case.name in GPU_ONLY_REFUSALS and torch.cuda.is_available():
        pytest.skip("the fused kernels run on this machine")
    line = _refusal(case, tmp_path, two_process_launch)
    assert line.startswith("pretrain_gpt_mhc.py: error: ")
    assert "\n" not in line
    assert case.message.replace("{run}", str(tmp_path)) in line


def test_good_launch_passes_and_writes_nothing(tmp_path, two_process_launch):
    two_process_launch.setattr(sys, "argv", _argv(tmp_path, ()))
    args, config = parse_and_check_arguments(set_globals=False)
    assert config.mhc_active and args.world_size == 2
    assert list(tmp_path.iterdir()) == []


def _reported(monkeypatch, rank: int, error: BaseException, capsys):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(launch_checks, "_OTHER_RANKS_EXIT_DELAY_S", 0.0)
    with pytest.raises(SystemExit) as stopped:
        with launch_errors_reported():
            raise error
    return stopped.value.code, capsys.readouterr()


def test_refusal_is_printed_by_rank_0_only_and_named_in_torchruns_summary(
    tmp_path, monkeypatch, capsys
):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.delenv("MHC_TRACEBACK", raising=False)
    code, out = _reported(monkeypatch, 0, ValueError("--lr -1.0: must be positive"), capsys)
    line = "pretrain_gpt_mhc.py: error: --lr -1.0: must be positive"
    assert code == 2 and out.err == line + "\n" and out.out == ""
    assert json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"] == line
    error_file.unlink()
    code, out = _reported(monkeypatch, 1, ValueError("--lr -1.0: must be positive"), capsys)
    assert code == 2 and out.err == "" and out.out == "" and not error_file.exists()


def test_megatron_bare_assertion_is_named_by_its_condition(monkeypatch, capsys):
    monkeypatch.delenv("MHC_TRACEBACK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)

    def megatron_check():
        assert 3 % 2 == 0

    try:
        megatron_check()
    except AssertionError as err:
        code, out = _reported(monkeypatch, 0, err, capsys)
    assert code == 2
    assert out.err.startswith("pretrain_gpt_mhc.py: error: Megatron's check failed (")
    assert "assert 3 % 2 == 0" in out.err and out.err.count("\n") == 1


def test_traceback_is_kept_with_mhc_traceback(monkeypatch):
    monkeypatch.setenv("MHC_TRACEBACK", "1")
    with pytest.raises(ValueError, match="must be positive"):
        with launch_errors_reported():
            raise ValueError("--lr -1.0: must be positive")


def test_argparse_error_is_one_line_by_rank_0_and_torchruns_named_cause(
    tmp_path, two_process_launch, capsys
):
    """Not argparse's usage block (about 750 lines with Megatron's flags) and exit: the launch's
    one line, exit code 2 on every rank, and the line in torchrun's error file."""
    error_file = tmp_path / "error.json"
    two_process_launch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    two_process_launch.setattr(launch_checks, "_OTHER_RANKS_EXIT_DELAY_S", 0.0)
    run = tmp_path / "run"
    run.mkdir()
    two_process_launch.setattr(sys, "argv", _argv(run, ("--mhc-type", "bogus")))
    printed = {}
    for rank in (0, 1):
        two_process_launch.setenv("RANK", str(rank))
        with pytest.raises(SystemExit) as stopped:
            with launch_errors_reported():
                parse_and_check_arguments()
        assert stopped.value.code == 2
        printed[rank] = capsys.readouterr()
    line = (
        "pretrain_gpt_mhc.py: error: argument --mhc-type: invalid choice: 'bogus' (choose from "
        "'mhc', 'hc', 'hc_static') (see pretrain_gpt_mhc.py --help)"
    )
    assert printed[0].err == line + "\n" and printed[0].out == ""
    assert printed[1].err == "" and printed[1].out == ""
    assert json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"] == line
    assert list(run.iterdir()) == []


ARGUMENT_LIST_END = "-------------------- end of arguments ---------------------"


@pytest.mark.parametrize(
    "flags",
    [
        ("--mhc-num-residual-streams", "0"),  # checked on the flags as given
        # checked with Megatron's settings, on the model config built after validate_args
        ("--recompute-granularity", "full", "--recompute-method", "uniform")
        + ("--recompute-num-layers", "1", "--mhc-recompute-layer-num", "1"),
    ],
    ids=["mhc-field", "mhc-with-megatron-feature"],
)
def test_mhc_error_line_is_not_buried_under_megatrons_argument_list(
    flags, tmp_path, two_process_launch, capsys
):
    two_process_launch.setattr(sys, "argv", _argv(tmp_path, flags))
    with pytest.raises(SystemExit):
        with launch_errors_reported():
            parse_and_check_arguments()
    printed = capsys.readouterr()
    assert ARGUMENT_LIST_END not in printed.out
    assert printed.err.startswith("pretrain_gpt_mhc.py: error: ") and printed.err.count("\n") == 1
    assert "mhc_recompute_layer_num" in printed.err or "--mhc-num-residual-streams 0" in printed.err


def test_good_launch_prints_megatrons_argument_list_after_the_checks(
    tmp_path, two_process_launch, capsys
):
    two_process_launch.setattr(sys, "argv", _argv(tmp_path, ()))
    parse_and_check_arguments(set_globals=False)
    assert ARGUMENT_LIST_END in capsys.readouterr().out


@pytest.mark.parametrize(
    "schedule_flag", ["--use-checkpoint-opt_param-scheduler", "--override-opt-param-scheduler"]
)
def test_either_schedule_flag_lets_a_finished_run_train_on(
    schedule_flag, tmp_path, two_process_launch
):
    _finished_run_checkpoint(tmp_path)
    two_process_launch.setattr(sys, "argv", _argv(tmp_path, (schedule_flag,)))
    args, _ = parse_and_check_arguments(set_globals=False)
    assert getattr(args, schedule_flag.lstrip("-").replace("-", "_"))


def test_errors_doc_lists_every_case():
    doc = ERRORS_DOC.read_text()
    for case in CASES:
        assert f"| {case.name} |" in doc, case.name
        assert _doc_message(case.message) in doc, case.name


def _doc_message(message: str) -> str:
    return message.replace("{run}", "RUN").replace("|", "\\|")


def _doc_rows() -> str:
    """The rows of docs/errors.md's table, with today's messages (run from the repository
    root: `python -m tests.unit.test_launch_errors`)."""
    import tempfile

    os.environ.update(WORLD_SIZE="2", RANK="0")
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            patch = pytest.MonkeyPatch()
            try:
                line = _refusal(case, run, patch)
            finally:
                patch.undo()
            flags = " ".join(case.flags).replace("{run}", "RUN").replace("{repo}/", "")
            flags = flags.replace("|", "\\|") or "(the --load directory)"
            message = line.removeprefix("pretrain_gpt_mhc.py: error: ")
            rows.append(
                f"| {case.name} | `{flags}` | {_doc_message(message.replace(str(run), 'RUN'))} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8")
    print(_doc_rows())
