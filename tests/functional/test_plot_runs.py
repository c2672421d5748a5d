"""tools/plot_runs.py on the TensorBoard logs of two real runs of the tiny configs (2 processes,
PP=2): the 50-iteration mHC golden run (tests/functional/conftest.py) and a 10-iteration baseline.
Every figure and the summary are written as valid images,
a baseline alone is plotted without the mHC figures, a folder without event files is a clear
error, and mHC's token-averaged H_res read back from the logs is doubly stochastic in every layer
of both pipeline stages. The mHC figures read as intended: the Amax gain on a linear axis around
1 for mHC (a log axis once a gain leaves [0.5, 2]), every H_res value written in its cell, the
colour bar saying what it shows, the layers of the mappings figure named."""

import importlib.util
import itertools
import re
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


@pytest.fixture(scope="module")
def golden_mhc_run(golden_run):
    return plot_runs.load_run(golden_run[0] / "tensorboard", "mhc")


def test_amax_gain_axis_is_linear_around_1_for_mhc_and_log_once_a_gain_leaves(golden_mhc_run):
    figure = plot_runs.amax_gain_figure([golden_mhc_run])
    figure.canvas.draw()
    for ax in figure.axes:
        low, high = ax.get_ylim()
        assert ax.get_yscale() == "linear" and low < 0.9 and high > 1.1
        assert ax.yaxis.get_major_formatter().get_offset() == ""  # plain ticks, no 1e-5 offsets
    grown = plot_runs.Run(
        "hc",
        {
            tag: {step: 40 * value for step, value in values.items()}
            if "amax_gain" in tag
            else values
            for tag, values in golden_mhc_run.scalars.items()
        },
    )
    figure = plot_runs.amax_gain_figure([golden_mhc_run, grown])
    assert [ax.get_yscale() for ax in figure.axes] == ["log"] * 3


def _with_distinct_h_res(run):
    """The run with every logged H_res entry (i, j) replaced by a value of its own, so that a
    value written into another cell shows (the golden run's mHC matrices are nearly uniform)."""
    entry = re.compile(r"mhc/(?:layer\d+/)?h_res/(\d+)_(\d+)")
    scalars = {}
    for tag, values in run.scalars.items():
        found = entry.fullmatch(tag)
        if found:
            i, j = (int(g) for g in found.groups())
            values = {step: (4 * i + j) / 16 + step / 1e4 for step in values}
        scalars[tag] = values
    return plot_runs.Run(run.name, scalars)


@pytest.mark.parametrize("distinct", [False, True], ids=["golden", "distinct-entries"])
def test_h_res_heatmap_writes_every_value_in_its_cell_and_names_its_colour_bar(
    golden_mhc_run, distinct
):
    run = _with_distinct_h_res(golden_mhc_run) if distinct else golden_mhc_run
    figure = plot_runs.h_res_heatmap_figure([run], None)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    assert list(panels) == [f"layer {k}" for k in (1, 2, 3, 4)] + ["stack composite (own scale)"]
    prefixes = [f"mhc/layer{k:02d}/h_res" for k in (1, 2, 3, 4)] + ["mhc/h_res"]
    for (title, ax), prefix in zip(panels.items(), prefixes, strict=True):
        matrix = run.matrix(prefix, 50)
        assert sorted((t.get_position(), t.get_text()) for t in ax.texts) == sorted(
            ((j, i), f"{v:.2f}") for i, row in enumerate(matrix) for j, v in enumerate(row)
        ), title
        width, height = ax.get_window_extent().size  # pixels at the figure's dpi
        assert min(width, height) * 90 / figure.dpi >= 120, title  # as saved, dpi 90
    labels = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert labels == ["mhc\nit 50", "per-layer H_res entry\n(mixing weight)"]  # run, colour bar


def test_large_values_fit_their_cells_and_the_panels_start_under_the_title(golden_mhc_run):
    # A diverging HC run's composite reaches 10^4-10^5 (docs/results.md): "25977.31" in 7 pt
    # is wider than a cell.
    scalars = {
        tag: {step: -25977.31 * (1 + 0.1 * step) for step in values}
        if re.fullmatch(r"mhc/h_res/\d+_\d+", tag)
        else values
        for tag, values in golden_mhc_run.scalars.items()
    }
    figure = plot_runs.h_res_heatmap_figure([plot_runs.Run("hc", scalars)], None)
    renderer = figure.canvas.get_renderer()
    # Title, then the panels: no band of blank figure between them.
    title_bottom = figure._suptitle.get_window_extent(renderer).y0
    panels_top = max(ax.get_window_extent(renderer).y1 for ax in figure.axes)
    assert 0 < (title_bottom - panels_top) / figure.dpi < 0.5
    (composite,) = [ax for ax in figure.axes if ax.get_title().startswith("stack")]
    cell_width = composite.get_window_extent(renderer).width / 4
    for text in composite.texts:
        assert text.get_window_extent(renderer).width < cell_width, text.get_text()
    assert {t.get_text() for t in composite.texts} == {"-1.6e5"}  # -25977.31 x (1 + 50 / 10)
    assert [plot_runs.cell_text(v) for v in (0.25, -1.234, 15.04, 123.4, 1234.5, 4.2e6)] == [
        "0.25",
        "-1.23",
        "15",
        "123",
        "1.2e3",
        "4.2e6",
    ]


def _run_with_layer_ends(run, end):
    """The run with each layer's mean mappings ending at `end(layer)` (a straight line there)."""
    scalars = {}
    for tag, values in run.scalars.items():
        found = re.fullmatch(r"mhc/layer(\d+)/h_(pre|post)_mean", tag)
        if found:
            values = {step: end(int(found.group(1))) + step / 1e3 for step in values}
        scalars[tag] = values
    return plot_runs.Run(run.name, scalars)


@pytest.mark.parametrize("ends", ["golden", "apart", "together"])
def test_mappings_figure_names_each_line_where_it_ends_without_overlap(golden_mhc_run, ends):
    spread = ends == "apart"
    run = {
        "golden": golden_mhc_run,
        "apart": _run_with_layer_ends(golden_mhc_run, lambda layer: layer),
        "together": _run_with_layer_ends(golden_mhc_run, lambda layer: 0.5),
    }[ends]
    figure = plot_runs.mappings_figure([run])
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["layer 1", "layer 2", "layer 3", "layer 4", "stack mean"]
        labels = {text.get_text(): text for text in ax.texts}
        assert sorted(labels) == sorted(lines)
        boxes = []
        for name, text in labels.items():
            assert text.get_color() == lines[name].get_color(), name
            box = text.get_window_extent(renderer)
            assert box.x0 > ax.get_window_extent(renderer).x1, name  # right of the panel
            boxes.append(box)
            if spread and name != "stack mean":  # ends a whole unit apart: labels stay level
                end = ax.transData.transform((0, lines[name].get_ydata()[-1]))[1]
                assert abs((box.y0 + box.y1) / 2 - end) < 1, name
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b)
