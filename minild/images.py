"""Sample grids: which classes or prompts a grid shows, and writing ``[B, C, H, W]`` images as one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from minild.conditioning import DEFAULT_PROMPT_TEMPLATES, class_prompt_name, wants_text
from minild.io import atomic_write


def grid_labels(pipe, num: int) -> list[int] | None:
    """Cycle through the classes for a class-conditional model, so the grid shows every class."""
    num_classes = getattr(pipe.model, "num_classes", None)
    return None if num_classes is None else [i % num_classes for i in range(num)]


def grid_prompts(pipe, num: int) -> list[str] | None:
    """For a text-conditioned model whose class names are known, cycle through one prompt per
    class made with the config's first prompt template ("a handwritten digit seven", …)."""
    if not wants_text(pipe.model) or pipe.text_encoder is None or not pipe.class_names:
        return None
    template = (pipe.config.data.prompt_templates or DEFAULT_PROMPT_TEMPLATES)[0]
    names = pipe.class_names
    return [
        template.format(name=class_prompt_name(names[i % len(names)]), label=i % len(names)) for i in range(num)
    ]


def grid_conditions(pipe, num: int) -> dict:
    """``generate`` keyword arguments for a grid of ``num`` images: class labels, prompts or nothing."""
    labels = grid_labels(pipe, num)
    if labels is not None:
        return {"class_labels": labels}
    prompts = grid_prompts(pipe, num)
    return {"prompts": prompts} if prompts is not None else {}


def grid_columns(pipe) -> int | None:
    """One column per class (or per class prompt), so every row of a digit grid reads 0, 1, …, 9."""
    if grid_prompts(pipe, 1) is not None:
        return len(pipe.class_names)
    return getattr(pipe.model, "num_classes", None)


def save_grid(images, path: str | Path, nrow: int | None = None) -> None:
    """Write ``[B, C, H, W]`` images in [0, 1] as one PNG grid (square-ish unless ``nrow`` is given)."""
    from torchvision.utils import save_image

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    atomic_write(path, lambda tmp: save_image(images, str(tmp), format="png", nrow=nrow, padding=2))


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
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
