"""Runs of pretrain_gpt_mhc.py for the functional tests: torchrun subprocesses on CPU (gloo)
with the tiny mHC config, and what they logged.

`run_pretrain(workdir, *flags)` trains configs/gpt_tiny_mhc.yaml with --log-interval 1,
checkpoints in `workdir/checkpoints`, and returns the run's log text and its per-iteration
losses (from the `[mhc]` lines, which print the loss exactly). `file_digests(directory)`
fingerprints a checkpoint directory, to show that a run left it untouched.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/gpt_tiny_mhc.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "gpt_tiny_mhc_50_iterations.json"
BASE_FLAGS = [
    "--train-iters",
    "50",
    "--lr-warmup-iters",
    "5",
    "--log-interval",
    "1",
    "--eval-interval",
    "1000",
    "--eval-iters",
    "0",
    "--save-interval",
    "1000",
]
# Losses over 50 training steps amplify last-bit differences between CPUs: MKL, ATen and oneDNN
# pick kernels by processor (vendor, AVX2 / AVX-512 / AMX), each rounding in its own way (oneDNN's
# JIT GELU, which torch uses for fp32 on CPU, differs from iteration 7 on between its AVX2 and
# AVX-512 code). Golden values are compared on whatever machine CI gets, so the runs use code
# paths every x86-64 CPU with AVX2 has: MKL's conditional-numerical-reproducibility mode, ATen's
# non-vectorized kernels, oneDNN's AVX2 kernels, one thread.
PORTABLE_CPU_NUMERICS = {
    "OMP_NUM_THREADS": "1",
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# The golden run also evaluates (2 batches at iterations 25 and 50): evaluation must not change
# the training losses, and tools/plot_runs.py's test reads the validation loss from it.
GOLDEN_FLAGS = ["--eval-interval", "25", "--eval-iters", "2"]
_LOSS = re.compile(r"\[mhc\] iteration +(\d+) \| lm loss: ([^ |]+) \|")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_processes_of(launch: str) -> None:
    """SIGKILL every process still running from the launch marked `launch` (torchrun starts
    each rank in a session of its own, so only the environment tells them)."""
    for process in psutil.process_iter():
        try:
            if process.environ().get("MHC_TEST_LAUNCH") == launch:
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def run_pretrain(
    workdir: Path,
    *flags: str,
    nproc: int = 2,
    timeout: int = 900,
    config: str = CONFIG,
    env: dict | None = None,
):
    """(log, {iteration: loss}) of a run of `config` (a YAML config, by default the tiny mHC
    GPT), with `env` added to the environment; raises with the log's tail if it fails."""
    checkpoints = workdir / "checkpoints"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        str(REPO / "pretrain_gpt_mhc.py"),
        "--config",
        config,
        *BASE_FLAGS,
        "--save",
        str(checkpoints),
        "--load",
        str(checkpoints),
        "--tensorboard-dir",
        str(workdir / "tensorboard"),
        *flags,
    ]
    launch = uuid.uuid4().hex
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        MHC_TEST_LAUNCH=launch,
        **PORTABLE_CPU_NUMERICS,
        **(env or {}),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / f"run{len(list(workdir.glob('run*.log')))}.log"
    # The log goes to a file, not a pipe: a process the launch leaves behind (a rank's
    # checkpoint writer after the rank was killed) keeps its end open.
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
            proc.wait()
            _end_processes_of(launch)
    log = log_file.read_text()
    if proc.returncode != 0:
        raise RuntimeError(
            f"pretrain run failed ({proc.returncode}): {' '.join(cmd)}\n{log[-4000:]}"
        )
    return log, {int(i): float(v) for i, v in _LOSS.findall(log)}


def file_digests(directory: Path) -> dict:
    """{path relative to `directory`: sha256} of every file below `directory`."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def load_golden() -> dict:
    data = json.loads(GOLDEN.read_text())
    return {int(i): v for i, v in data["lm_loss"].items()}


def write_golden(losses: dict) -> None:
    GOLDEN.write_text(
        json.dumps(
            {
                "what": "lm loss per iteration of the tiny mHC GPT "
                "(CPU, gloo, 2 processes, TP=1 PP=2)",
                "command": "MHC_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest "
                "tests/functional/test_pretrain.py -k golden",
                "flags": BASE_FLAGS + GOLDEN_FLAGS,
                "lm_loss": {str(i): losses[i] for i in sorted(losses)},
            },
            indent=1,
        )
        + "\n"
    )
