"""The guidance frontier: class accuracy against digit-FID, one line per guidance method through
its scales, next to the floor of real digits and the region a good setting should reach."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

# A setting is on target when it is nearly always the requested digit and nearly as varied as real digits.
TARGET_ACCURACY = 0.985
TARGET_FID_FACTOR = 1.3  # digit-FID at most this many times the real-digit floor
ZOOM_ACCURACY = 0.9  # the right panel shows only settings at least this accurate


def plot_frontier(rows: list[dict], baseline: dict, path: str | Path | BinaryIO, *, title: str = "") -> None:
    """Write ``frontier.png``: x = digit-FID (log scale), y = mean accuracy; one line with markers
    per ``row["method"]`` through its ``guidance_scale`` values (each point annotated with its
    scale); the real-digit floor (``baseline``'s digit-FID and accuracy) as a star and dashed lines;
    the target region (accuracy ≥ 98.5 %, digit-FID ≤ 1.3 × floor) shaded. The left panel shows
    every setting, the right one zooms in on those at least 90 % accurate.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, PercentFormatter

    methods = list(dict.fromkeys(row["method"] for row in rows))  # in order of appearance
    floor_fid, floor_accuracy = baseline["digit_fid"], baseline["mean_accuracy"]
    target_fid = TARGET_FID_FACTOR * floor_fid
    figure = Figure(figsize=(13, 5.2), dpi=100)
    FigureCanvasAgg(figure)
    full, zoom = figure.subplots(1, 2)
    fids = [row["digit_fid"] for row in rows] + [floor_fid]
    left = 0.8 * min(fids)
    close = [row["digit_fid"] for row in rows if row["mean_accuracy"] >= ZOOM_ACCURACY]
    zoom_right = max([1.2 * max(close, default=0), 1.6 * target_fid])
    panels = ((full, "log", 1.25 * max(fids), 0.0), (zoom, "linear", zoom_right, ZOOM_ACCURACY))
    for axes, x_scale, x_right, y_bottom in panels:
        axes.fill_between([left, target_fid], TARGET_ACCURACY, 1.005, color="tab:green", alpha=0.12, lw=0,
                          label=f"target: accuracy ≥ {TARGET_ACCURACY:.1%}, FID ≤ {TARGET_FID_FACTOR:g}× floor")
        axes.axvline(floor_fid, color="gray", ls="--", lw=1)
        axes.axhline(floor_accuracy, color="gray", ls=":", lw=1)
        axes.plot([floor_fid], [floor_accuracy], "*", color="black", ms=13,
                  label=f"real digits: FID {floor_fid:.1f}, {floor_accuracy:.1%}")
        for method in methods:
            points = sorted((row["guidance_scale"], row["digit_fid"], row["mean_accuracy"])
                            for row in rows if row["method"] == method)
            line, = axes.plot([fid for _, fid, _ in points], [accuracy for _, _, accuracy in points], "o-",
                              label=method, ms=5)
            for scale, fid, accuracy in points:
                if left <= fid <= x_right and accuracy >= y_bottom:
                    axes.annotate(f"{scale:g}", (fid, accuracy), textcoords="offset points", xytext=(4, 4),
                                  fontsize=8, color=line.get_color())
        axes.set(xscale=x_scale, xlim=(left, x_right), ylim=(y_bottom, 1.005), ylabel="mean class accuracy",
                 xlabel=f"digit-FID against held-out digits ({x_scale} scale; lower = closer to real digits)")
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        if x_scale == "log":
            axes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
            for formatter in (axes.xaxis.set_major_formatter, axes.xaxis.set_minor_formatter):
                formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.grid(True, which="both", alpha=0.25)
    full.set_title("every method × guidance scale (numbers: scales)")
    zoom.set_title(f"settings at least {ZOOM_ACCURACY:.0%} accurate")
    zoom.legend(loc="lower right", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    if isinstance(path, (str, Path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
