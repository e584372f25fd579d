"""Sample grids: which class labels a grid shows, and writing ``[B, C, H, W]`` images as one PNG."""

from __future__ import annotations

import math
from pathlib import Path


def grid_labels(pipe, num: int) -> list[int] | None:
    """Cycle through the classes for a class-conditional model, so the grid shows every class."""
    num_classes = getattr(pipe.model, "num_classes", None)
    return None if num_classes is None else [i % num_classes for i in range(num)]


def grid_columns(pipe) -> int | None:
    """One column per class, so every row of the grid reads 0, 1, …, 9 for digits."""
    return getattr(pipe.model, "num_classes", None)


def save_grid(images, path: str | Path, nrow: int | None = None) -> None:
    """Write ``[B, C, H, W]`` images in [0, 1] as one PNG grid (square-ish unless ``nrow`` is given)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2)


def save_titled_grid(images, path: str | Path, title: str, nrow: int | None = None) -> None:
    """Like ``save_grid``, under a title (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0)  # [3, H, W]
    scale = max(2.0, 600 / grid.shape[2])  # enlarge small grids so the title fits
    height, width = grid.shape[1] * scale, grid.shape[2] * scale  # pixels at dpi 100
    header = 10 + 16 * (title.count("\n") + 1)
    figure = Figure(figsize=(width / 100, (height + header) / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, height / (height + header)))
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_axis_off()
    figure.text(0.5, 1 - 4 / (height + header), title, fontsize=10, ha="center", va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
