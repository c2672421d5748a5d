"""Figures and a summary table of pretrain_gpt_mhc.py runs, from their TensorBoard event files.

    python tools/plot_runs.py --out DIR RUN_TB_DIR [RUN_TB_DIR ...] [--label NAME ...]
                              [--iteration N] [--smoothing 0.9]

Each RUN_TB_DIR is a run's `--tensorboard-dir`; the run is named after it (after its parent when
it is called `tensorboard`) or by the `--label` in the same position. Writes to DIR:

- `loss.png`: training loss (raw and smoothed) and validation loss against iterations and tokens;
- `amax_gain.png`: forward and backward Amax gain of the composite residual mapping of the whole
  stack over training, and the largest per-layer gain (a linear axis while every gain stays in
  [0.5, 2], as mHC's do; a log axis when a run's leaves it);
- `h_res_heatmap.png`: the token-averaged H_res of every layer and of the stack's composite, at
  the last logged iteration (or the last one up to `--iteration`), values written in the cells
  (up to 6 streams);
- `mappings.png`: mean H_pre and mean H_post of each layer over training, each line named where
  it ends;
- `grad_norm.png` and `throughput.png` (tokens/s);
- `summary.md`: final losses, largest gains, throughput and the health figures' cost.

Runs without hyper-connections (the baseline) have no mHC figures: they appear in the loss,
grad-norm and throughput figures only, and the mHC figures are left out when no run has them.
"""

import argparse
import io
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402  (a dependency of matplotlib)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAIN_LOSS = "lm loss"
VALIDATION_LOSS = "lm loss validation"
_LAYER_TAG = re.compile(r"mhc/layer(\d+)/(.+)")
_MATRIX_ENTRY = re.compile(r"(\d+)_(\d+)")
H_RES_CONVENTION = (
    "H_res = comb transposed: x'_k = H_post[k] F(u) + sum_j H_res[k, j] x_j "
    "(row k: output stream, column j: input stream); token-averaged"
)


@dataclass
class Run:
    """The scalars one run logged: {tag: {iteration: value}} (the last value per iteration)."""

    name: str
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        points = sorted(self.scalars.get(tag, {}).items())
        return [step for step, _ in points], [value for _, value in points]

    @property
    def has_mhc(self) -> bool:
        return "mhc/amax_gain_fwd" in self.scalars

    def layers(self) -> list[int]:
        return sorted({int(m.group(1)) for tag in self.scalars if (m := _LAYER_TAG.fullmatch(tag))})

    def matrix(self, prefix: str, iteration: int) -> list[list[float]]:
        """The n x n matrix logged as `{prefix}/i_j` at `iteration`."""
        entries = {}
        for tag, values in self.scalars.items():
            if tag.startswith(prefix + "/") and iteration in values:
                entry = _MATRIX_ENTRY.fullmatch(tag[len(prefix) + 1 :])
                if entry:
                    entries[int(entry.group(1)), int(entry.group(2))] = values[iteration]
        n = int(math.isqrt(len(entries)))
        if n == 0 or n * n != len(entries):
            raise ValueError(
                f"run {self.name}: no complete {prefix} matrix at iteration {iteration}"
            )
        return [[entries[i, j] for j in range(n)] for i in range(n)]

    def tokens_at(self, iterations: list[int]) -> list[float]:
        """Tokens consumed by each iteration, interpolated between the logged `train/tokens`."""
        steps, tokens = self.series("train/tokens")
        steps, tokens = [0, *steps], [0.0, *tokens]
        result = []
        for iteration in iterations:
            k = next((k for k, step in enumerate(steps) if step >= iteration), len(steps) - 1)
            k = max(k, 1)
            slope = (tokens[k] - tokens[k - 1]) / max(steps[k] - steps[k - 1], 1)
            result.append(tokens[k - 1] + slope * (iteration - steps[k - 1]))
        return result


def run_name(directory: Path) -> str:
    directory = directory.resolve()
    return directory.parent.name if directory.name in ("tensorboard", "tb") else directory.name


def load_run(directory: Path, name: str) -> Run:
    if not directory.is_dir():
        raise ValueError(f"RUN_TB_DIR {directory}: not a directory")
    if not any(directory.rglob("events.out.tfevents.*")):
        raise ValueError(
            f"RUN_TB_DIR {directory}: no TensorBoard event files (events.out.tfevents.*) in it; "
            "pass a run's --tensorboard-dir"
        )
    run = Run(name)
    # Megatron writes one event file per launch into the directory (resumed runs add more).
    for events in sorted({path.parent for path in directory.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values = run.scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                values[event.step] = event.value
    if TRAIN_LOSS not in run.scalars:
        raise ValueError(f"RUN_TB_DIR {directory}: no '{TRAIN_LOSS}' scalars in its event files")
    return run


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average."""
    smoothed, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**k))
    return smoothed


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _colors(runs: list[Run]) -> dict[str, str]:
    palette = plt.get_cmap("tab10")
    return {run.name: palette(k % 10) for k, run in enumerate(runs)}


def plot_loss(runs: list[Run], out: Path, smoothing: float) -> None:
    colors = _colors(runs)
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for run in runs:
        steps, loss = run.series(TRAIN_LOSS)
        val_steps, val_loss = run.series(VALIDATION_LOSS)
        has_tokens = "train/tokens" in run.scalars
        for ax, by_tokens in zip(axes, (False, True), strict=True):
            if by_tokens and not has_tokens:
                continue
            x = run.tokens_at(steps) if by_tokens else steps
            val_x = run.tokens_at(val_steps) if by_tokens else val_steps
            color = colors[run.name]
            ax.plot(x, loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, smooth(loss, smoothing), color=color, linewidth=1.6, label=run.name)
            if val_steps:
                ax.plot(val_x, val_loss, "o--", color=color, markersize=4, linewidth=1)
    for ax, xlabel in zip(axes, ("iteration", "tokens"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("lm loss")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"training loss: raw (faint), smoothed ({smoothing}); validation (o--)")
    axes[1].set_title("against tokens consumed")
    axes[0].legend(fontsize=8)
    _set_loss_limits(axes, runs)
    _save(figure, out / "loss.png")


def _set_loss_limits(axes, runs: list[Run]) -> None:
    """Keep the interesting range in view: the first iterations' loss and a diverged run's
    spikes would flatten every other curve."""
    values = [v for run in runs for v in finite(run.series(TRAIN_LOSS)[1])]
    if not values:
        return
    low = min(values)
    tail = [v for run in runs for v in finite(run.series(TRAIN_LOSS)[1])[len(values) // 20 :]]
    high = max(statistics.median(tail) * 1.6, low + 1.0) if tail else max(values)
    for ax in axes:
        ax.set_ylim(low - 0.1, min(max(values), high) + 0.1)


GAIN_LINEAR_RANGE = (0.5, 2.0)
"""Gains inside it are drawn on a linear axis (mHC stays at 1); a run leaving it gets a log one."""


def gain_axis_scale(values: list[float]) -> str:
    """'linear' when every finite gain lies in GAIN_LINEAR_RANGE, else 'log'."""
    low, high = GAIN_LINEAR_RANGE
    return "linear" if all(low <= v <= high for v in finite(values)) else "log"


def amax_gain_figure(runs: list[Run]):
    colors = _colors(runs)
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    plotted = []
    for run in runs:
        color = colors[run.name]
        for ax, direction in zip(axes[:2], ("fwd", "bwd"), strict=True):
            steps, gains = run.series(f"mhc/amax_gain_{direction}")
            ax.plot(steps, gains, color=color, label=run.name)
            plotted += gains
        layer_max = {}
        for layer in run.layers():
            for direction in ("fwd", "bwd"):
                for step, value in run.scalars.get(
                    f"mhc/layer{layer:02d}/amax_gain_{direction}", {}
                ).items():
                    layer_max[step] = max(layer_max.get(step, value), value)
        steps = sorted(layer_max)
        axes[2].plot(steps, [layer_max[s] for s in steps], color=color, label=run.name)
        plotted += list(layer_max.values())
    scale = gain_axis_scale(plotted)
    titles = (
        "forward Amax gain of the stack (max |row sum|)",
        "backward Amax gain of the stack (max |column sum|)",
        "largest per-layer gain (fwd or bwd)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_yscale(scale)
        ax.set_xlabel("iteration")
        ax.set_title(title, fontsize=10)
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
        ax.grid(alpha=0.3, which="both")
    if scale == "linear":
        # Around 1 and in plain numbers: mHC's gains differ from 1 by ~1e-5, which an
        # autoscaled axis would spread over the whole height as offsets of 0.99999.
        low, high = min(finite(plotted), default=1.0), max(finite(plotted), default=1.0)
        axes[0].set_ylim(min(low, 0.9) - 0.02, max(high, 1.1) + 0.02)
        for ax in axes:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    axes[0].set_ylabel(f"gain (token average, {scale} axis)")
    axes[0].legend(fontsize=8)
    return figure


def _heatmap_iteration(run: Run, iteration: int | None) -> int:
    steps = sorted(run.scalars.get("mhc/h_res/0_0", {}))
    if iteration is not None:
        steps = [s for s in steps if s <= iteration]
    if not steps:
        raise ValueError(f"run {run.name}: no H_res matrices logged up to iteration {iteration}")
    return steps[-1]


def _mixing_scale(matrices) -> tuple[str, float, float]:
    """(colormap, low, high): mixing weights in [0, 1] (mHC: doubly stochastic) on a fixed
    sequential scale, so runs compare; others (unconstrained HC) on a diverging one around 0."""
    values = [v for _, matrix in matrices for row in matrix for v in row]
    if 0.0 <= min(values) and max(values) <= 1.0:
        return "viridis", 0.0, 1.0
    bound = max(abs(v) for v in values)
    return "RdBu_r", -bound, bound


def _draw_mixing(ax, matrix, scale, annotate: bool):
    """The matrix as an image; with `annotate` each cell's value written in it, in black or
    white by the cell's brightness."""
    cmap, low, high = scale
    image = ax.imshow(matrix, cmap=cmap, vmin=low, vmax=high)
    ax.set_xticks([])
    ax.set_yticks([])
    if annotate:
        for (i, j), value in _entries(matrix):
            red, green, blue, _ = image.cmap(image.norm(value))
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(j, i, cell_text(value), ha="center", va="center", fontsize=7, color=ink)
    return image


def cell_text(value: float) -> str:
    """A matrix entry in at most 5 characters, so that it fits its cell: 2 decimals below 10
    (mixing weights), fewer digits above, a short power of ten from 1000 on (HC's composite
    reaches 10^5 in a diverging run)."""
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 1000:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _entries(matrix):
    return [((i, j), value) for i, row in enumerate(matrix) for j, value in enumerate(row)]


HEATMAP_PANELS_PER_ROW = 9
HEATMAP_CELL_INCHES = 0.42
"""A cell of a matrix: room for a value written in 7 pt."""
HEATMAP_TITLE_INCHES = 0.7
"""Room above the panels for the figure's two-line title."""
ANNOTATED_STREAMS = 6
"""Values are written into the cells of matrices up to this size (n x n)."""


def h_res_heatmap_figure(runs: list[Run], iteration: int | None):
    """Each run's per-layer H_res and their composite, HEATMAP_PANELS_PER_ROW panels to a row."""
    panels = {
        run.name: [
            (f"layer {layer}", run.matrix(f"mhc/layer{layer:02d}/h_res", step))
            for layer in run.layers()
        ]
        + [("stack composite (own scale)", run.matrix("mhc/h_res", step))]
        for run in runs
        for step in [_heatmap_iteration(run, iteration)]
    }
    rows_per_run = {name: -(-len(p) // HEATMAP_PANELS_PER_ROW) for name, p in panels.items()}
    columns = min(HEATMAP_PANELS_PER_ROW, max(len(p) for p in panels.values()))
    n = max(len(matrix) for p in panels.values() for _, matrix in p)
    side = max(n * HEATMAP_CELL_INCHES, 1.0)
    height = sum(rows_per_run.values()) * (side + 0.55) + HEATMAP_TITLE_INCHES
    figure, axes = plt.subplots(
        sum(rows_per_run.values()),
        columns,
        figsize=(columns * (side + 0.35) + 2.2, height),
        squeeze=False,
    )
    # Margins in inches, not fractions: a fraction of a tall figure leaves inches blank.
    figure.subplots_adjust(top=1 - HEATMAP_TITLE_INCHES / height, bottom=0.2 / height)
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for run in runs:
        run_panels = panels[run.name]
        run_axes = axes[row : row + rows_per_run[run.name]].flat
        layers = run_panels[:-1]
        layer_image = None
        for ax, (title, matrix) in zip(run_axes, run_panels, strict=False):
            ax.axis("on")
            is_composite = title.startswith("stack")
            scale = _mixing_scale([run_panels[-1]] if is_composite else layers)
            image = _draw_mixing(ax, matrix, scale, annotate=len(matrix) <= ANNOTATED_STREAMS)
            layer_image = layer_image if is_composite else image
            ax.set_title(title, fontsize=8)
        axes[row][0].set_ylabel(
            f"{run.name}\nit {_heatmap_iteration(run, iteration)}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=9,
        )
        if layer_image is not None:
            bar = figure.colorbar(
                layer_image, ax=list(axes[row : row + rows_per_run[run.name]].flat), fraction=0.02
            )
            bar.set_label("per-layer H_res entry\n(mixing weight)", fontsize=8)
        row += rows_per_run[run.name]
    figure.suptitle(
        "per-layer H_res (attention then MLP mixing) and their composite over the stack\n"
        f"{H_RES_CONVENTION}",
        fontsize=9,
        y=1 - 0.1 / height,
    )
    return figure


LINE_LABEL_POINTS = 6.5
"""Size of the names written at the end of the mappings figure's lines."""


def mappings_figure(runs: list[Run]):
    figure, axes = plt.subplots(
        len(runs),
        2,
        # Tall enough for 16 layer names and the stack mean's beside each panel.
        figsize=(13.5, 3.3 * len(runs) + 0.6),
        squeeze=False,
        sharex=True,
        gridspec_kw={"wspace": 0.32},
    )
    depth = plt.get_cmap("viridis")
    for (pre_ax, post_ax), run in zip(axes, runs, strict=True):
        layers = run.layers()
        for ax, mapping in ((pre_ax, "h_pre_mean"), (post_ax, "h_post_mean")):
            for k, layer in enumerate(layers):
                # viridis without its palest yellow, which does not read as text on white.
                color = depth(0.85 * k / max(len(layers) - 1, 1))
                series = run.series(f"mhc/layer{layer:02d}/{mapping}")
                ax.plot(*series, color=color, lw=0.9, label=f"layer {layer}")
            ax.plot(*run.series(f"mhc/{mapping}"), "k--", lw=1.2, label="stack mean")
            ax.grid(alpha=0.3)
            # Colours alone do not tell 16 layers apart: each line is named where it ends.
            label_line_ends(ax)
        pre_ax.set_ylabel(f"{run.name}\nmean H_pre")
        post_ax.set_ylabel("mean H_post")
    axes[0][0].set_title("mean H_pre per layer (colour: depth)")
    axes[0][1].set_title("mean H_post per layer (colour: depth)")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    return figure


def label_line_ends(ax) -> None:
    """Writes each line's label right of `ax`, in the line's colour, level with its last point;
    labels closer than a line of text are moved apart, in the order of the lines' ends."""
    low, high = ax.get_ylim()  # settles the autoscaled limits
    height_points = ax.get_position().height * ax.figure.get_figheight() * 72
    gap = 1.15 * LINE_LABEL_POINTS / height_points  # in fractions of the axes' height
    ends = sorted(
        (
            ((finite(list(line.get_ydata()))[-1] - low) / (high - low), line)
            for line in ax.get_lines()
            if finite(list(line.get_ydata()))
        ),
        key=lambda end: end[0],
    )
    if not ends:
        return
    places = [ends[0][0]]
    for end, _ in ends[1:]:
        places.append(max(end, places[-1] + gap))
    # Pushed above the axes by a crowd at the top: move the crowd down again.
    places[-1] = min(places[-1], max(1.0, places[0] + gap * (len(places) - 1)))
    for k in range(len(places) - 2, -1, -1):
        places[k] = min(places[k], places[k + 1] - gap)
    for place, (_, line) in zip(places, ends, strict=True):
        ax.text(
            1.01,
            place,
            line.get_label(),
            transform=ax.transAxes,
            color=line.get_color(),
            fontsize=LINE_LABEL_POINTS,
            va="center",
        )


def plot_series(runs: list[Run], tag: str, ylabel: str, path: Path, log: bool) -> None:
    colors = _colors(runs)
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        steps, values = run.series(tag)
        if steps:
            ax.plot(steps, values, color=colors[run.name], label=run.name, linewidth=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    # A 256-colour palette keeps each PNG small enough to commit next to the docs.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(runs: list[Run]) -> str:
    lines = [
        "| run | iterations | final train loss (last / mean of last 10%) | final val loss "
        "| max fwd gain | max bwd gain | max per-layer gain | tokens/s (median) "
        "| health figures (ms per log, share of interval) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        steps, loss = run.series(TRAIN_LOSS)
        tail = loss[-max(len(loss) // 10, 1) :]
        val = run.series(VALIDATION_LOSS)[1]
        gains = {d: finite(run.series(f"mhc/amax_gain_{d}")[1]) for d in ("fwd", "bwd")}
        layer_gains = [
            v
            for tag, values in run.scalars.items()
            if _LAYER_TAG.fullmatch(tag) and "amax_gain" in tag
            for v in finite(list(values.values()))
        ]
        throughput = run.series("throughput/tokens_per_s")[1]
        cost_ms = run.series("throughput/health_figures_ms")[1]
        share = run.series("throughput/health_figures_share")[1]
        cost = (
            f"{statistics.median(cost_ms):.1f} ms, {100 * statistics.median(share):.2f}%"
            if cost_ms and share
            else "-"
        )
        lines.append(
            f"| {run.name} | {steps[-1]} | {loss[-1]:.4f} / {statistics.fmean(tail):.4f} "
            f"| {_format(val[-1] if val else None, '.4f')} "
            f"| {_format(max(gains['fwd'], default=None), '.5g')} "
            f"| {_format(max(gains['bwd'], default=None), '.5g')} "
            f"| {_format(max(layer_gains, default=None), '.5g')} "
            f"| {_format(statistics.median(throughput) if throughput else None, '.1f')} "
            f"| {cost} |"
        )
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[Run], out: Path, iteration: int | None, smoothing: float) -> list[Path]:
    """Write the figures and summary.md of `runs` to `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(runs, out, smoothing)
    plot_series(runs, "grad-norm", "grad norm", out / "grad_norm.png", log=True)
    plot_series(runs, "throughput/tokens_per_s", "tokens/s", out / "throughput.png", log=False)
    hc_runs = [run for run in runs if run.has_mhc]
    if hc_runs:
        _save(amax_gain_figure(hc_runs), out / "amax_gain.png")
        _save(h_res_heatmap_figure(hc_runs, iteration), out / "h_res_heatmap.png")
        _save(mappings_figure(hc_runs), out / "mappings.png")
    (out / "summary.md").write_text(summary_table(runs))
    names = ["loss", "grad_norm", "throughput"]
    if hc_runs:
        names += ["amax_gain", "h_res_heatmap", "mappings"]
    return [out / f"{name}.png" for name in names] + [out / "summary.md"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_TB_DIR")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument(
        "--label", action="append", default=[], help="a run's name, in RUN_TB_DIR order"
    )
    parser.add_argument(
        "--iteration", type=int, default=None, help="heatmap iteration (default: the last)"
    )
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA weight in [0, 1)")
    args = parser.parse_args(argv)
    if len(args.label) > len(args.runs):
        parser.error(f"--label given {len(args.label)} times for {len(args.runs)} RUN_TB_DIRs")
    if not 0.0 <= args.smoothing < 1.0:
        parser.error(f"--smoothing {args.smoothing}: must be in [0, 1)")
    names = args.label + [run_name(path) for path in args.runs[len(args.label) :]]
    if len(set(names)) != len(names):
        parser.error(f"run names must differ (got {names}); give --label for each run")
    try:
        runs = [load_run(path, name) for path, name in zip(args.runs, names, strict=True)]
        written = plot_runs(runs, args.out, args.iteration, args.smoothing)
    except ValueError as error:
        parser.error(str(error))
    print("\n".join(str(path) for path in written))


if __name__ == "__main__":
    sys.exit(main())
