"""Labelled image grids: images written as one PNG whose rows, columns and blocks of columns carry
labels (``save_labeled_grid``)."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

from minild.io import atomic_write

PADDING = 2  # white pixels around every image, as torchvision's make_grid
BLOCK_GAP = 6  # extra white pixels between two column blocks
MIN_CELL = 56  # small images are enlarged (by an integer factor) to at least this many pixels a side
MAX_SCALE = 8
LABEL_SIZE, TITLE_SIZE = 10, 11  # points; at dpi 100 one point is 100/72 pixels
MARGIN = 6  # pixels between labels and images, and around the figure


@dataclass
class GridLayout:
    """What ``save_labeled_grid`` drew, in pixels of the PNG (origin at its top left):
    ``labels`` holds one ``(role, text, x, y)`` per text, role ``"title"``, ``"block"``,
    ``"column"`` or ``"row"``; ``grid_box`` is the images' ``(left, top, right, bottom)``."""

    width: int
    height: int
    scale: int
    grid_box: tuple[int, int, int, int]
    labels: list[tuple[str, str, float, float]] = field(default_factory=list)


def save_labeled_grid(
    images,
    path: str | Path | BinaryIO,
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    column_blocks: Sequence[str] | None = None,
    title: str | None = None,
) -> GridLayout:
    """Write images in [0, 1] as one PNG grid with a label for every row, column and block.

    ``images`` is ``[R, K, C, H, W]`` (R rows of K images) or ``[B, C, H, W]``, filled row by
    row into K = ``len(column_labels)`` columns (else ``B / len(row_labels)``, else about √B).
    ``row_labels``: R strings, left of the rows. ``column_labels``: K strings above the columns.
    ``column_blocks``: one header per block of equal width ("scale 1.5", "cfg_interval · 3"); K
    must be a multiple of their number, and a white gap separates the blocks. ``title`` (may
    hold newlines) goes on top. Images smaller than 56 pixels are enlarged by an integer factor
    (nearest neighbour) so that labels stay readable next to 28×28 digits. ``path`` may be a
    binary file object (e.g. ``io.BytesIO`` for a notebook). Drawn on matplotlib's Agg canvas,
    without pyplot's global state. Returns the layout.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _grid_rows(images, row_labels, column_labels)  # [R, K, 3, H, W]
    num_rows, num_columns, _, height, width = rows.shape
    _check_labels("row_labels", row_labels, num_rows, "rows")
    _check_labels("column_labels", column_labels, num_columns, "columns")
    num_blocks = len(column_blocks) if column_blocks else 1
    if column_blocks is not None and (not column_blocks or num_columns % num_blocks):
        raise ValueError(f"column_blocks: {num_columns} columns do not split into {len(column_blocks or [])} blocks "
                         "of equal width; give one header per block of columns")
    figure = Figure(dpi=100)
    canvas = FigureCanvasAgg(figure)
    measure = _text_measurer(canvas.get_renderer())
    per_block = num_columns // num_blocks
    scale, column_blocks = _enlargement(height, width, per_block, column_blocks or [], measure)
    pixels = _grid_pixels(rows, num_blocks, scale)  # [H', W', 3]
    cell_width, cell_height = (width + PADDING) * scale, (height + PADDING) * scale
    column_sizes = [measure(text, LABEL_SIZE) for text in column_labels or []]
    rotate_columns = any(w > cell_width - 4 for w, _ in column_sizes)  # too wide: stand them upright
    column_header = max((w if rotate_columns else h for w, h in column_sizes), default=0)
    block_header = max((measure(text, LABEL_SIZE)[1] for text in column_blocks), default=0)
    title_height = measure(title, TITLE_SIZE)[1] if title else 0
    left = MARGIN + (max(measure(text, LABEL_SIZE)[0] for text in row_labels) + MARGIN if row_labels else 0)
    top = MARGIN + sum(size + MARGIN for size in (title_height, block_header, column_header) if size)
    left, top = math.ceil(left), math.ceil(top)
    figure_width = max(left + pixels.shape[1] + MARGIN, math.ceil(measure(title, TITLE_SIZE)[0]) + 2 * MARGIN
                       if title else 0)
    left += (figure_width - left - pixels.shape[1] - MARGIN) // 2  # centred under a title wider than the grid
    figure_height = top + pixels.shape[0] + MARGIN
    figure.set_size_inches(figure_width / 100, figure_height / 100)
    figure.figimage(pixels, xo=left, yo=MARGIN, origin="upper")
    layout = GridLayout(figure_width, figure_height, scale, (left, top, left + pixels.shape[1], top + pixels.shape[0]))

    def put(role, text, x, y, size=LABEL_SIZE, **style):
        figure.text(x / figure_width, 1 - y / figure_height, text, fontsize=size, **style)
        layout.labels.append((role, text, x, y))

    def column_left(column):
        return left + scale * PADDING / 2 + column * cell_width + (column // per_block) * BLOCK_GAP * scale

    y = MARGIN
    if title:
        put("title", title, figure_width / 2, y, TITLE_SIZE, ha="center", va="top")
        y += title_height + MARGIN
    if column_blocks:
        for block, text in enumerate(column_blocks):
            middle = (column_left(block * per_block) + column_left((block + 1) * per_block - 1) + cell_width) / 2
            put("block", text, middle, y, ha="center", va="top", fontweight="bold")
        y += block_header + MARGIN
    for column, text in enumerate(column_labels or []):
        x = column_left(column) + cell_width / 2
        put("column", text, x, top - MARGIN, ha="center", va="bottom", rotation=90 if rotate_columns else 0)
    for row, text in enumerate(row_labels or []):
        put("row", text, left - MARGIN, top + scale * PADDING / 2 + (row + 0.5) * cell_height, ha="right", va="center")
    if isinstance(path, (str, Path)):  # to a temporary name, then renamed: no half-written PNG
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    else:
        figure.savefig(path, format="png", dpi=100)
    return layout


def labeled_grid_png(images, **labels) -> bytes:
    """The PNG ``save_labeled_grid`` writes, as bytes (a notebook shows it with
    ``IPython.display.Image(labeled_grid_png(images, row_labels=...))``)."""
    buffer = io.BytesIO()
    save_labeled_grid(images, buffer, **labels)
    return buffer.getvalue()


def _grid_rows(images, row_labels, column_labels):
    """``[R, K, 3, H, W]`` from a 5-D grid or a 4-D batch (the last row padded with white)."""
    import torch

    images = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    if images.dim() == 4:
        count = len(images)
        if column_labels is not None:
            columns = len(column_labels)
        elif row_labels:
            columns = math.ceil(count / len(row_labels))
        else:
            columns = math.ceil(math.sqrt(count))
        missing = -count % max(columns, 1)
        images = torch.cat([images, images.new_ones(missing, *images.shape[1:])]).unflatten(0, (-1, max(columns, 1)))
    if images.dim() != 5 or images.shape[2] not in (1, 3) or 0 in images.shape:
        raise ValueError(f"save_labeled_grid takes images [R, K, C, H, W] or [B, C, H, W] with C = 1 or 3, "
                         f"got shape {tuple(images.shape)}")
    return images.expand(-1, -1, 3, -1, -1)


def _enlargement(height: int, width: int, per_block: int, block_labels: list[str], measure) -> tuple[int, list[str]]:
    """The integer factor that makes images at least ``MIN_CELL`` pixels and blocks wide enough for
    their headers, and the headers broken into lines (at " · ", ":" and ",") to fit their blocks."""
    scale = max(1, min(MAX_SCALE, math.ceil(MIN_CELL / max(height, width))))
    block_labels = [_wrap(text, per_block * (width + PADDING) * scale - 2 * MARGIN, measure) for text in block_labels]
    widest = max((measure(text, LABEL_SIZE)[0] for text in block_labels), default=0)
    while scale < MAX_SCALE and per_block * (width + PADDING) * scale < widest + 2 * MARGIN:
        scale += 1
    return scale, block_labels


def _grid_pixels(rows, num_blocks: int, scale: int):
    """The images on a white canvas ``[H', W', 3]`` (numpy), blocks apart, enlarged ``scale`` times."""
    import torch

    num_rows, num_columns, _, height, width = rows.shape
    per_block = num_columns // num_blocks
    canvas = torch.ones(3, num_rows * (height + PADDING) + PADDING,
                        num_columns * (width + PADDING) + PADDING + (num_blocks - 1) * BLOCK_GAP)
    for row in range(num_rows):
        for column in range(num_columns):
            top = PADDING + row * (height + PADDING)
            left = PADDING + column * (width + PADDING) + (column // per_block) * BLOCK_GAP
            canvas[:, top:top + height, left:left + width] = rows[row, column]
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return canvas.permute(1, 2, 0).numpy()


def _text_measurer(renderer):
    """``measure(text, size) -> (width, height)`` in pixels, as the renderer will draw it."""
    from matplotlib.font_manager import FontProperties

    def measure(text: str, size: float) -> tuple[float, float]:
        lines = str(text).split("\n") or [""]
        sizes = [renderer.get_text_width_height_descent(line or " ", FontProperties(size=size), ismath=False)
                 for line in lines]
        return max(w for w, _, _ in sizes), sum(h for _, h, _ in sizes) + 0.3 * size * (len(lines) - 1)

    return measure


def _wrap(text: str, width: float, measure) -> str:
    """``text`` in lines no wider than ``width`` pixels where it can break: before " · ", after ":" or ","."""
    pieces = [piece for piece in re.split(r"(?<=[:,])|(?= · )", text) if piece]
    lines = [""]
    for piece in pieces:
        if lines[-1] and measure(lines[-1] + piece, LABEL_SIZE)[0] > width:
            lines.append(piece.lstrip())
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _check_labels(name: str, labels, count: int, what: str) -> None:
    if labels is not None and len(labels) != count:
        raise ValueError(f"{name}: got {len(labels)} labels for a grid of {count} {what}; give one per {what[:-1]}")
