"""The guidance frontier experiment's parts: guidance methods named and checked, model evaluations
counted, and the plot of class accuracy against digit-FID, one line per method through its scales,
next to the floor of real digits and the region a good setting should reach."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch

from minild.config import parse_stage
from minild.io import atomic_write

# A setting is on target when it is nearly always the requested digit and nearly as varied as real digits.
TARGET_ACCURACY = 0.985
TARGET_FID_FACTOR = 1.3  # digit-FID at most this many times the real-digit floor
ZOOM_ACCURACY = 0.9  # the right panel shows only settings at least this accurate


def plot_frontier(rows: list[dict], baseline: dict, path: str | Path | BinaryIO, *, title: str = "") -> None:
    """Write ``frontier.png``: x = digit-FID, y = mean accuracy; one line with markers
    per ``row["method"]`` through its ``guidance_scale`` values (each point annotated with its
    scale); the real-digit floor (``baseline``'s digit-FID and accuracy) as a star and dashed lines;
    the target region (accuracy ≥ 98.5 %, digit-FID ≤ 1.3 × floor) shaded. The left panel shows
    every setting (FID on a log scale), the right one zooms in on those at least 90 % accurate.
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
                  label=f"real digits, same n ({baseline.get('num_images', '?')}): FID {floor_fid:.1f}, {floor_accuracy:.1%}")
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
    save_png(figure, path)


def save_png(figure, path: str | Path | BinaryIO) -> None:
    """A matplotlib figure as PNG: to a path atomically (a temporary name, then renamed: no
    half-written PNG), or to a binary file object."""
    if isinstance(path, (str, Path)):
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    else:
        figure.savefig(path, format="png")


def guidance_name(spec: str | dict | None, pipeline=None) -> str:
    """A guidance spec as the command line writes it, without its ``scale`` (the sweep sets it):
    ``"apg"``, ``"cfg_interval:sigma_low=0.3"``; None is the pipeline's configured guidance
    (``"cfg"`` when its config names none)."""
    if spec is None:
        configured = getattr(getattr(pipeline, "config", None), "guidance", None)
        spec = configured.to_dict() if configured is not None else "cfg"
    if isinstance(spec, str):
        return spec
    params = ",".join(f"{key}={value}" for key, value in spec.items() if key not in ("name", "scale"))
    return spec["name"] + (f":{params}" if params else "")


def count_model_evaluations(pipeline):
    """A context manager counting the images that go through the pipeline's eps-model (and its
    EMA copy): ``counter.images`` after the block, None when the model is not a torch module."""
    return _EvaluationCounter([getattr(pipeline, name, None) for name in ("model", "ema_model")])


class _EvaluationCounter:
    def __init__(self, models):
        self.models = [model for model in models if isinstance(model, torch.nn.Module)]
        self.images = 0 if self.models else None

    def _count(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]  # [B, C, H, W]
        self.images += x.shape[0]

    def __enter__(self):
        self.handles = [model.register_forward_pre_hook(self._count, with_kwargs=True) for model in self.models]
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


def check_methods(methods) -> list:
    """``[None]`` (the configured guidance) or the specs, each a name or a dict with a ``name``."""
    if methods is None:
        return [None]
    if isinstance(methods, (str, dict)) or not methods:
        raise ValueError(f"methods must be a non-empty list of guidance specs (names or dicts), got {methods!r}; "
                         "e.g. ['cfg', {'name': 'cfg_interval', 'sigma_low': 0.3}]")
    for method in methods:
        name = method.get("name") if isinstance(method, dict) else method
        if not isinstance(name, str) or not name:
            raise ValueError(f"methods: {method!r} is not a guidance spec; give a name ('apg') or a dict with "
                             "'name' and the method's parameters")
        parse_stage("guidance", method, "methods", name)  # fails here, not after some cells
    return list(methods)


def sampler_name(sampler, pipeline) -> str:
    if sampler is not None:
        return sampler if isinstance(sampler, str) else sampler.get("name", "the configured sampler")
    configured = getattr(getattr(pipeline, "config", None), "sampler", None)
    return getattr(configured, "name", None) or "the configured sampler"

