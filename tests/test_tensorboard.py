"""The ``tensorboard`` trainer hook: scalars and fixed-seed sample grids read back from its event
files, and a clear error when the optional package is missing."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import minild
from minild.errors import UnavailableError
from tests.conftest import tiny_config
from tests.test_train import tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py

TENSORBOARD = {"name": "tensorboard", "every_steps": 1, "sample_every_steps": 2, "sample_every_epochs": None,
               "num_images": 4, "num_inference_steps": 2}


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_hook_writes_loss_lr_throughput_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": 5, "hooks": [TENSORBOARD]}))  # 4 per epoch
    result = pipe.train(tiny_dataset(64), run_dir=tmp_path)
    accumulator = events(tmp_path)
    assert {"train/loss", "train/lr", "train/images_per_second", "train/epoch_mean_loss"} <= set(
        accumulator.Tags()["scalars"])
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2, 3, 4, 5]
    assert [event.value for event in losses] == pytest.approx(result.losses, rel=1e-6)
    assert [event.value for event in accumulator.Scalars("train/lr")] == pytest.approx([1e-3] * 5)
    grids = accumulator.Images("samples")
    assert [event.step for event in grids] == [2, 4] and grids[0].width == 4 * 28
    assert [event.step for event in accumulator.Scalars("train/epoch_mean_loss")] == [4]


def test_tensorboard_samples_are_those_of_the_sample_grid_hook(tmp_path):
    pytest.importorskip("tensorboard")
    recorded = []

    class Record:
        @minild.hookimpl
        def minild_samples_saved(self, images):
            recorded.append(images)

    grid = {"name": "sample_grid", "every_steps": 2, "every_epochs": None, "num_images": 4, "num_inference_steps": 2}
    name = minild.register_plugin(Record(), name="test-record-samples")
    try:
        pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": 2, "hooks": [TENSORBOARD, grid]}))
        pipe.train(tiny_dataset(64), run_dir=tmp_path)
    finally:
        minild.unregister_plugin(name)
    encoded = events(tmp_path).Images("samples")[0].encoded_image_string
    logged = torch.from_numpy(np.array(Image.open(io.BytesIO(encoded)).convert("L"))).float() / 255
    expected = torch.cat(list(recorded[0][:, 0]), dim=1)  # the 4 images side by side: [28, 4 × 28]
    assert logged.shape == expected.shape
    assert torch.allclose(logged, expected, atol=1 / 255 + 1e-6)


def test_tensorboard_hook_without_the_package_names_the_extra_at_train_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": 2, "hooks": ["tensorboard"]}))
    with pytest.raises(UnavailableError, match=r'the \'tensorboard\' trainer hook needs the tensorboard package '
                                               r'.*: pip install "minild\[tensorboard\]", or remove the hook'):
        pipe.train(tiny_dataset(64), run_dir=tmp_path)
