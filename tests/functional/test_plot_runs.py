"""tools/plot_runs.py on the TensorBoard logs of two real runs of the tiny configs (2 processes,
PP=2): the 50-iteration mHC golden run (tests/functional/conftest.py) and a 10-iteration baseline.
Every figure and the summary are written as valid images,
a baseline alone is plotted without the mHC figures, a folder without event files is a clear
error, and mHC's token-averaged H_res read back from the logs is doubly stochastic in every layer
of both pipeline stages."""

import importlib.util
import itertools
import subprocess
import sys

import matplotlib.image
import pytest

from tests.functional.pretrain_runs import REPO, run_pretrain

SHORT_RUN = ["--train-iters", "10", "--eval-interval", "5", "--eval-iters", "2"]
ALL_FIGURES = ["loss", "grad_norm", "throughput", "amax_gain", "h_res_heatmap", "mappings"]


def _plot_runs_module():
    spec = importlib.util.spec_from_file_location("plot_runs", REPO / "tools" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_runs = _plot_runs_module()


@pytest.fixture(scope="module")
def run_logs(golden_run, tmp_path_factory):
    """{name: tensorboard dir} of the mHC golden run and a 10-iteration baseline run."""
    workdir = tmp_path_factory.mktemp("baseline")
    run_pretrain(workdir, *SHORT_RUN, config="configs/gpt_tiny_baseline.yaml")
    return {"mhc": golden_run[0] / "tensorboard", "baseline": workdir / "tensorboard"}


def _assert_valid_png(path):
    assert path.stat().st_size > 0, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path


def test_every_figure_and_the_summary_are_written_for_mhc_and_baseline(run_logs, tmp_path):
    runs = [str(run_logs["mhc"]), str(run_logs["baseline"])]
    plot_runs.main(["--out", str(tmp_path), "--label", "mhc", "--label", "baseline", *runs])
    for name in ALL_FIGURES:
        _assert_valid_png(tmp_path / f"{name}.png")
    rows = (tmp_path / "summary.md").read_text().splitlines()
    mhc_row = next(row for row in rows if row.startswith("| mhc"))
    baseline_row = next(row for row in rows if row.startswith("| baseline"))
    mhc_cells = [cell.strip() for cell in mhc_row.strip("|").split("|")]
    baseline_cells = [cell.strip() for cell in baseline_row.strip("|").split("|")]
    assert (mhc_cells[1], baseline_cells[1]) == ("50", "10")  # iterations
    assert float(mhc_cells[3]) < 9.0 and float(baseline_cells[3]) < 9.0  # val loss below ln V
    assert float(mhc_cells[4]) == pytest.approx(1.0, abs=1e-3)  # mHC: forward gain 1
    assert baseline_cells[4] == "-"  # no hyper-connections, no gain
    assert float(mhc_cells[7]) > 0 and float(baseline_cells[7]) > 0  # tokens/s


def test_baseline_alone_is_plotted_without_the_mhc_figures(run_logs, tmp_path):
    plot_runs.main(["--out", str(tmp_path), "--label", "plain", str(run_logs["baseline"])])
    for name in ("loss", "grad_norm", "throughput"):
        _assert_valid_png(tmp_path / f"{name}.png")
    for name in ("amax_gain", "h_res_heatmap", "mappings"):
        assert not (tmp_path / f"{name}.png").exists()
    assert "| plain | 10 |" in (tmp_path / "summary.md").read_text()


def test_a_folder_without_event_files_is_a_clear_error(tmp_path):
    empty = tmp_path / "no_events"
    empty.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "plot_runs.py"),
            "--out",
            str(tmp_path / "out"),
            str(empty),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"RUN_TB_DIR {empty}: no TensorBoard event files" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_mhc_h_res_read_back_from_the_logs_is_doubly_stochastic(run_logs):
    run = plot_runs.load_run(run_logs["mhc"], "mhc")
    assert run.layers() == [1, 2, 3, 4]  # both pipeline stages' layers, by global number
    iterations = sorted(run.scalars["mhc/h_res/0_0"])
    assert iterations == list(range(1, 51))
    prefixes = [f"mhc/layer{layer:02d}/h_res" for layer in run.layers()] + ["mhc/h_res"]
    for prefix, iteration in itertools.product(prefixes, iterations):
        matrix = run.matrix(prefix, iteration)
        assert len(matrix) == 4
        for k in range(4):
            assert sum(matrix[k]) == pytest.approx(1.0, abs=1e-3), (prefix, iteration, k)
            assert sum(row[k] for row in matrix) == pytest.approx(1.0, abs=1e-3), (prefix, k)
            assert min(matrix[k]) >= 0.0
