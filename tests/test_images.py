"""Labelled grids: every grid minild writes names its rows, columns and blocks of columns."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import minild
from minild.images import save_labeled_grid
from minild.pipeline.grids import grid_column_labels
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def digits(rows: int, columns: int) -> torch.Tensor:
    """[R, K, 1, 28, 28] in [0, 1]: a bright square on black, like a digit's contrast."""
    images = torch.zeros(rows, columns, 1, 28, 28)
    images[..., 8:20, 8:20] = 1.0
    return images


def dark_pixels(path, box) -> int:
    return int((np.asarray(Image.open(path).convert("L").crop(box)) < 128).sum())


def test_labels_enlarge_the_grid_and_are_drawn_beside_it(tmp_path):
    bare = save_labeled_grid(digits(10, 4), tmp_path / "bare.png")
    labels = [str(digit) for digit in range(10)]
    layout = save_labeled_grid(digits(10, 4), tmp_path / "labelled.png", row_labels=labels,
                               column_blocks=["scale 1.5", "scale 3"], title="rows: digits 0–9")
    assert Image.open(tmp_path / "labelled.png").size == (layout.width, layout.height)
    assert layout.width > bare.width and layout.height > bare.height
    assert layout.scale >= 2  # 28×28 digits are enlarged so that labels stay readable beside them
    assert [text for role, text, _, _ in layout.labels if role == "row"] == labels
    assert [text for role, text, _, _ in layout.labels if role == "block"] == ["scale 1.5", "scale 3"]
    left, top, right, bottom = layout.grid_box
    assert dark_pixels(tmp_path / "labelled.png", (0, top, left, bottom)) > 0  # row labels left of the images
    assert dark_pixels(tmp_path / "labelled.png", (0, 0, layout.width, top)) > 0  # title and block headers above
    empty = save_labeled_grid(digits(10, 4), tmp_path / "empty.png", row_labels=[""] * 10)
    assert dark_pixels(tmp_path / "empty.png", (0, empty.grid_box[1], empty.grid_box[0], empty.grid_box[3])) == 0


def test_block_headers_are_centred_over_their_blocks(tmp_path):
    layout = save_labeled_grid(digits(2, 6), tmp_path / "grid.png", column_blocks=["cfg · 1", "apg · 3", "cfg · 5"])
    centres = [x for role, _, x, _ in layout.labels if role == "block"]
    left, _, right, _ = layout.grid_box
    assert centres == sorted(centres) and left < centres[0] < centres[1] < centres[2] < right
    assert centres[1] == pytest.approx((left + right) / 2, abs=2)


def test_a_batch_fills_one_row_per_label_count_and_long_column_labels_turn_upright(tmp_path):
    prompts = [f"a handwritten digit {word}" for word in "zero one two".split()]
    layout = save_labeled_grid(digits(2, 3).flatten(0, 1), tmp_path / "grid.png", column_labels=prompts)
    assert [text for role, text, _, _ in layout.labels if role == "column"] == prompts
    left, top, right, bottom = layout.grid_box
    assert (right - left) < (bottom - top) * 3 / 2 + 20  # 3 columns by 2 rows
    assert top > 100  # the prompts stand upright above their columns


def test_a_grid_can_be_written_to_a_buffer(tmp_path):
    buffer = io.BytesIO()
    layout = save_labeled_grid(digits(1, 5).flatten(0, 1), buffer, title="five")
    assert Image.open(io.BytesIO(buffer.getvalue())).size == (layout.width, layout.height)


@pytest.mark.parametrize("labels, match", [
    ({"row_labels": ["0", "1", "2"]}, "row_labels: got 3 labels for a grid of 2 rows"),
    ({"column_blocks": ["a", "b"]}, "3 columns do not split into 2 blocks"),
])
def test_labels_that_do_not_fit_the_grid_are_an_error(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        save_labeled_grid(digits(2, 3), tmp_path / "grid.png", **labels)


def test_sample_grid_columns_are_named_by_class():
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    assert grid_column_labels(pipe) == [str(digit) for digit in range(10)]
    assert grid_column_labels(minild.Pipeline.from_config(tiny_config())) is None
