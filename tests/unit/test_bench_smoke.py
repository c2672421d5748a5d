"""The GPU benchmarks (bench/bench_kernels.py, bench/bench_step.py) run on CPU in their tiny smoke
mode and print the tables they promise, so that they cannot rot between GPU runs."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}
# The smoke mode of both benchmarks: on CPU, one warm-up, one timed repeat, an 8 MiB bandwidth
# probe.
SMOKE = ["--device", "cpu", "--repeats", "1", "--warmup", "1", "--copy-mib", "8"]


def _run(script, *args):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, *SMOKE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _table(stdout):
    """(header cells, rows of cells) of the markdown table in stdout."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1]) <= set("|-"), stdout
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_bench_kernels_cpu_smoke():
    out = _run(
        "bench_kernels.py",
        "--tokens",
        "16",
        "--hidden",
        "32",
        "--backends",
        "torch,triton,cutile,tile_kernels,te,liger",
    )
    header, rows = _table(out)
    assert header == [
        "T",
        "C",
        "op",
        "variant",
        "fwd (ms)",
        "bwd (ms)",
        "fwd+bwd (ms)",
        "fwd % BW",
        "bwd % BW",
        "fwd+bwd % BW",
        "vs torch (fwd+bwd)",
    ]
    assert [r[:4] for r in rows] == [
        ["16", "32", op, "torch"] for op in ("mappings", "collapse", "update", "head", "module")
    ]
    for row in rows:
        assert len(row) == len(header)
        assert all(float(v) >= 0 for v in row[4:7]), row
        assert all(re.fullmatch(r"\d+\.\d%", v) for v in row[7:10]), row
        assert row[10] == "1.00x"
    # Backends and peers that cannot run here are named, with the reason, not silently dropped.
    for name in ("backend triton", "backend cutile", "peer tile_kernels", "peer te", "peer liger"):
        assert re.search(rf"^{name}: not benchmarked \(.+\)$", out, re.M), out
    assert re.search(r"^device: CPU; torch .*copy bandwidth [\d.]+ GB/s", out, re.M), out


def test_bench_step_cpu_smoke():
    out = _run(
        "bench_step.py",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--seq",
        "16",
        "--micro-batch",
        "2",
        "--vocab",
        "128",
        "--backends",
        "torch",
    )
    header, rows = _table(out)
    assert header == [
        "variant",
        "n",
        "step time (ms)",
        "tokens/s",
        "overhead",
        "floor",
        "overhead / floor",
    ]
    assert [r[:2] for r in rows] == [["baseline (n=1)", "1"], ["mHC n=4, torch", "4"]]
    assert rows[0][4:] == ["-", "-", "-"]
    assert float(rows[1][2]) > 0 and rows[1][4].endswith("%") and rows[1][5].endswith("%")
    float(rows[1][6])
    assert re.search(
        r"^floor: \(8n\+5\)\*C\*2\*layers\*tokens\*bytes = .* of the baseline step$", out, re.M
    ), out
    assert re.search(r"^device: CPU; .*transformer_impl=local", out, re.M), out
