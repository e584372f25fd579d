"""Quality metrics for generated digits: a small CNN digit classifier (trained once on the bundled
digits and cached), class accuracy, digit-FID on its features, and loss-curve smoothness.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from minild.io import atomic_write, load_weights, save_weights

CLASSIFIER_NAME = "digit_classifier"
# Bump when anything below changes what training produces, so stale caches are retrained.
RECIPE_VERSION = 1
# 14 epochs of the 4,500 training digits at batch 128 (35 steps each); about a minute on one core.
TRAIN_STEPS = 490
TRAIN_BATCH_SIZE = 128
TRAIN_MAX_LR = 2e-3
TRAIN_SEED = 0


class DigitClassifier(nn.Module):
    """CNN for ``[B, 1, 28, 28]`` digits in [0, 1]: conv32 → pool → conv64 → pool → conv128
    → 128-d features (the digit-FID space) → 10 logits. Few enough FLOPs to train in a CPU minute."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_block(1, 32), nn.MaxPool2d(2),  # [B, 32, 14, 14]
            *_conv_block(32, 64), nn.MaxPool2d(2),  # [B, 64, 7, 7]
            *_conv_block(64, 128),  # [B, 128, 7, 7]
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(128 * 7 * 7, self.feature_dim), nn.ReLU(),  # [B, 128]
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 28, 28]`` in [0, 1] → penultimate features ``[B, 128]``."""
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 28, 28]`` in [0, 1] → logits ``[B, 10]``."""
        return self.head(self.features(x))


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


# ---------------------------------------------------------------------------- training and cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINILD_CACHE") or "~/.cache/minild").expanduser()


def load_digit_classifier(
    cache_dir: str | Path | None = None, *, retrain: bool = False, train_steps: int | None = None
) -> DigitClassifier:
    """The digit classifier in eval mode, trained on the bundled digits ``train`` split on first use.

    Weights are cached in ``cache_dir`` (default ``$MINILD_CACHE`` or ``~/.cache/minild``) as
    ``digit_classifier.safetensors`` beside ``digit_classifier.json`` (the training recipe, its
    accuracy on the held-out ``test`` split, training seconds). A cache whose recipe differs
    from the requested one (``train_steps``, default ``TRAIN_STEPS``) is retrained and
    overwritten; so is any cache when ``retrain`` is true. ``classifier.info`` holds the JSON.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights_path = cache_dir / f"{CLASSIFIER_NAME}.safetensors"
    info_path = cache_dir / f"{CLASSIFIER_NAME}.json"
    recipe = _recipe(TRAIN_STEPS if train_steps is None else train_steps)
    classifier = DigitClassifier()
    info = None if retrain else _read_info(info_path)
    if not (info is not None and info.get("recipe") == recipe and _try_load(classifier, weights_path)):
        classifier, info = train_digit_classifier(recipe["train_steps"])
        save_weights(classifier, weights_path)
        atomic_write(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    classifier.info = info
    return classifier.eval().requires_grad_(False)


def train_digit_classifier(train_steps: int = TRAIN_STEPS) -> tuple[DigitClassifier, dict]:
    """Train a fresh classifier and test it: about a minute on one CPU core.

    AdamW with a one-cycle learning rate, light random affine augmentation (±10°, ±2 px,
    ±10 % scale) so that it also reads the slightly off-centre digits a diffusion model draws.
    Seeded, and run on one thread so that the weights (and every digit-FID measured with
    them) do not depend on the thread count; a second thread would add little to so small a
    model, and much less than it costs on a busy machine.
    Returns the classifier in eval mode and its info dict (recipe, test accuracy, seconds).
    """
    from minild.data import load_dataset

    train = load_dataset("digits", split="train")
    images, labels = (train.images + 1) / 2, train.labels  # [N, 1, 28, 28] in [0, 1], [N]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier = _fit(images, labels, train_steps)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    classifier.eval().requires_grad_(False)
    test = load_dataset("digits", split="test")
    accuracy = mean_accuracy(classify(classifier, (test.images + 1) / 2), test.labels)
    info = {"recipe": _recipe(train_steps), "test_accuracy": round(accuracy, 4), "train_seconds": round(seconds, 1)}
    return classifier, info


def _fit(images: torch.Tensor, labels: torch.Tensor, train_steps: int) -> DigitClassifier:
    generator = torch.Generator().manual_seed(TRAIN_SEED)  # batch order and augmentation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)  # initial weights and dropout
        classifier = DigitClassifier()
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=TRAIN_MAX_LR, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=TRAIN_MAX_LR, total_steps=max(train_steps, 1))
        classifier.train()
        order = torch.empty(0, dtype=torch.long)
        for _ in range(train_steps):
            if len(order) < TRAIN_BATCH_SIZE:  # a new epoch; the last partial batch is dropped
                order = torch.randperm(len(images), generator=generator)
            batch, order = order[:TRAIN_BATCH_SIZE], order[TRAIN_BATCH_SIZE:]
            logits = classifier(random_affine(images[batch], generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier


def random_affine(
    images: torch.Tensor, generator: torch.Generator, *, degrees: float = 10.0, shift: float = 2.0, scale: float = 0.1
) -> torch.Tensor:
    """Rotate by ±``degrees``, shift by ±``shift`` pixels and zoom by ±``scale``, per image.

    ``images``: ``[B, C, H, W]`` with a black (0) background, which fills the uncovered border.
    """
    batch, _, height, width = images.shape
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(degrees)  # [B]
    zoom = 1 + (torch.rand(batch, generator=generator) * 2 - 1) * scale  # [B]
    offset = (torch.rand(batch, 2, generator=generator) * 2 - 1) * shift  # [B, 2] in pixels
    offset = offset * torch.tensor([2 / width, 2 / height])  # affine_grid works in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _try_load(classifier: DigitClassifier, path: Path) -> bool:
    try:
        load_weights(classifier, path)
    except (FileNotFoundError, ValueError, SafetensorError):  # missing, another architecture's, or corrupt
        return False
    return True


def _recipe(train_steps: int) -> dict:
    return {"version": RECIPE_VERSION, "train_steps": train_steps, "batch_size": TRAIN_BATCH_SIZE, "seed": TRAIN_SEED}


def _read_info(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


# ---------------------------------------------------------------------------- accuracy


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels ``[N]`` for ``images`` ``[N, 1, 28, 28]`` in [0, 1]."""
    _check_images(images)
    return torch.cat([classifier(chunk).argmax(dim=1) for chunk in images.split(batch_size)])


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> list[float]:
    """Fraction of each class's images predicted as that class; NaN for a class with no images."""
    predicted, labels = torch.as_tensor(predicted), torch.as_tensor(labels)
    accuracies = []
    for label in range(num_classes):
        mask = labels == label
        accuracies.append((predicted[mask] == label).double().mean().item() if mask.any() else float("nan"))
    return accuracies


def mean_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of all images predicted as their label."""
    return (torch.as_tensor(predicted) == torch.as_tensor(labels)).double().mean().item()


# ---------------------------------------------------------------------------- digit-FID


@torch.no_grad()
def digit_features(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features ``[N, 128]`` (float64) of ``images`` ``[N, 1, 28, 28]`` in [0, 1]."""
    _check_images(images)
    return torch.cat([classifier.features(chunk) for chunk in images.split(batch_size)]).double()


def digit_fid(classifier: DigitClassifier, images: torch.Tensor, reference_images: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of the classifier's features of two image sets.

    FID's recipe (Heusel et al. 2017) with this digit classifier in place of Inception: lower is
    closer. Reference: the held-out ``test`` digits. Like FID, it is biased by the sample
    sizes, so compare values computed with the same numbers of images.
    """
    return frechet_distance(digit_features(classifier, images), digit_features(classifier, reference_images))


def frechet_distance(features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """``|mu1 − mu2|² + tr(S1 + S2 − 2 (S1 S2)^½)`` for feature sets ``[N1, D]`` and ``[N2, D]``.

    tr (S1 S2)^½ = tr (√S1 S2 √S1)^½, and √S1 S2 √S1 is symmetric PSD, so two symmetric
    eigendecompositions replace scipy's general ``sqrtm``.
    """
    if len(features) < 2 or len(reference_features) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 images per set, got {len(features)} and {len(reference_features)}")
    mean1, cov1 = _gaussian_fit(features)
    mean2, cov2 = _gaussian_fit(reference_features)
    sqrt_cov1 = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(_symmetric(sqrt_cov1 @ cov2 @ sqrt_cov1)).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(distance.item(), 0.0)


def _gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)  # [D], [D, D] (unbiased, as numpy.cov)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(_symmetric(matrix))
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"the digit classifier reads [N, 1, 28, 28] images in [0, 1], got shape {tuple(images.shape)}")


# ---------------------------------------------------------------------------- training curves


def loss_smoothness(epoch_losses: list[float]) -> dict:
    """How smoothly a loss curve falls: the Module 16 demo's convergence metrics.

    Returns ``mean_abs_change`` (mean |loss[i+1] − loss[i]|), ``max_increase`` (the largest
    rise, 0 when none), ``num_increases`` (epochs whose loss rose), ``num_changes`` (len − 1) and
    ``monotonic`` (no rise at all). The demo took the absolute value before counting rises, so it
    counted every change as one; here rises are counted on the signed differences.
    """
    losses = [float(loss) for loss in epoch_losses]
    changes = [after - before for before, after in zip(losses, losses[1:])]
    increases = [change for change in changes if change > 0]
    return {
        "mean_abs_change": sum(abs(change) for change in changes) / len(changes) if changes else 0.0,
        "max_increase": max(increases, default=0.0),
        "num_increases": len(increases),
        "num_changes": len(changes),
        "monotonic": not increases,
    }
