"""The sbatch launcher, end to end, on a throw-away one-node Slurm cluster.

Runs tests/functional/slurm/run_slurm_test.sh, which installs Debian's Slurm and munge when they
are missing, starts munged/slurmctld/slurmd in a temp dir, submits
scripts/slurm/pretrain_gpt_mhc.sbatch (2 tasks, tiny config, a 30-iteration run that stops after
the checkpoint of iteration 20, then the same job resubmitted, which must resume there and finish),
checks job states, logs and checkpoints, and stops the daemons again. Run it alone with:

    .venv/bin/python -m pytest -s tests/functional/test_slurm.py

It is skipped only when it cannot run here: not root (the daemons and apt-get need it), or Slurm
is missing and apt-get is absent or fails (the script exits 77 for that). Anything else that goes
wrong fails it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "functional" / "slurm" / "run_slurm_test.sh"
SKIP_RC = 77  # the script's "cannot install / run Slurm here"
TIMEOUT_S = 600

pytestmark = pytest.mark.timeout(TIMEOUT_S + 120)


def _tail(text: str, n: int = 80) -> str:
    return "\n".join(text.splitlines()[-n:])


def test_sbatch_launcher_trains_and_resumes_on_local_slurm():
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("needs root: installs Debian's Slurm and runs slurmctld/slurmd/munged")
    daemons = ("slurmctld", "slurmd", "sbatch", "munged")
    if not all(shutil.which(d) for d in daemons) and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")

    env = dict(os.environ)
    # The jobs run the interpreter that runs this test (the project's venv under `make test`).
    env.setdefault("PYTHON", sys.executable)

    start = time.monotonic()
    # Own session, so that a timeout can signal the script (its trap then stops the daemons)
    # without touching anything else.
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap cancels its jobs, stops its daemons
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"run_slurm_test.sh did not finish in {TIMEOUT_S} s:\n{_tail(output)}")
    elapsed = time.monotonic() - start
    print(output)
    print(f"run_slurm_test.sh: exit {proc.returncode} after {elapsed:.0f} s")

    if proc.returncode == SKIP_RC:
        reasons = [line for line in output.splitlines() if line.startswith("SKIP:")]
        pytest.skip(reasons[-1] if reasons else "run_slurm_test.sh could not set up Slurm")
    assert proc.returncode == 0, (
        f"run_slurm_test.sh failed (exit {proc.returncode}):\n{_tail(output)}"
    )
    assert "PASS" in output
