"""The README's Python examples (build an mHC GPT, one forward and backward; the same as a
HybridModel) run as written."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python_example(section: str) -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme.split(section, 1)[1], re.S).group(1)


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_python_example_runs():
    stdout = _run(_python_example("## Build an mHC GPT in Python"))
    assert re.search(r"^MHCGPTModel loss \d+\.\d+$", stdout, re.M), stdout


def test_readme_hybrid_example_runs_after_the_gpt_one():
    stdout = _run(
        _python_example("## Build an mHC GPT in Python") + _python_example("### HybridModel")
    )
    assert re.search(r"^HyperConnectionHybridStack loss \d+\.\d+$", stdout, re.M), stdout
