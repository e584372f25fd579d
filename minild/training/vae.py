"""Training a VAE stage for latent diffusion (``minild train-vae``): reconstruction MSE plus a
small KL term, then the latent scale (1/std of the training latents), a reconstruction grid and
the reconstruction MSE, all written next to the VAE's weights."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from minild import plugins
from minild.training import lock
from minild.config import VAETrainingConfig
from minild.data import load_dataset
from minild.devices import resolve_device
from minild.images import save_labeled_grid
from minild.io import atomic_write

RECONSTRUCTIONS_NAME = "reconstructions.png"
METRICS_NAME = "metrics.json"
TRAINING_CONFIG_NAME = "train_vae.yaml"
EVALUATION_BATCH_SIZE = 256


@dataclass
class VAETrainResult:
    vae: torch.nn.Module
    steps: int
    epochs_completed: int
    seconds: float
    reason: str  # "max_steps", "epochs" or "max_minutes"
    losses: list[float] = field(default_factory=list)  # reconstruction MSE + kl_weight · KL, per step
    metrics: dict = field(default_factory=dict)  # what metrics.json holds


def train_vae(config: VAETrainingConfig, out_dir: str | Path | None = None,
              log: Callable[[str], None] | None = None) -> VAETrainResult:
    """Train the configured VAE, set its latent scale and, with ``out_dir``, save everything there:
    the VAE (``save_pretrained``), ``reconstructions.png`` (originals above, reconstructions below),
    ``metrics.json`` and the config as ``train_vae.yaml``, holding ``out_dir``'s lock
    (``minild.training.lock``) from the start: a second writer into it is refused before training."""
    with lock.hold(out_dir):
        return _train_and_save(config, out_dir, log)


def _train_and_save(config: VAETrainingConfig, out_dir: str | Path | None,
                    log: Callable[[str], None] | None) -> VAETrainResult:
    settings = config.train
    _validate(settings)
    vae = plugins.create("vae", config.vae.name, **config.vae.params)
    missing = [name for name in ("training_losses", "save_pretrained", "latent_scale") if not hasattr(vae, name)]
    if missing:
        raise ValueError(
            f"vae {config.vae.name!r} cannot be trained by minild (it has no {', '.join(missing)}); "
            "train-vae needs a trainable VAE such as digits_vae"
        )
    data = config.data
    dataset = load_dataset(data.dataset, root=data.root, image_size=data.image_size, channels=data.channels,
                           split=data.split)
    if not hasattr(dataset, "images"):
        raise ValueError(f"train-vae needs an in-memory dataset; data.dataset {data.dataset!r} is read from disk")
    vae.latent_shape(dataset.image_shape)  # raises for images this VAE cannot take
    device = resolve_device(settings.device)
    images = dataset.images.to(device)  # [N, C, H, W] in [-1, 1]
    batch_size = min(settings.batch_size, len(images))
    steps_per_epoch = len(images) // batch_size

    torch.manual_seed(settings.seed)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)  # CPU: the same run on every device
    losses: list[float] = []
    step = epoch = 0
    reason = None
    start = time.perf_counter()
    while reason is None:
        order = torch.randperm(len(images), generator=generator).to(device)
        for batch in range(steps_per_epoch):
            x = images[order[batch * batch_size : (batch + 1) * batch_size]]
            reconstruction_mse, kl = vae.training_losses(x, generator=generator)
            loss = reconstruction_mse + settings.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), settings.grad_clip)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise ValueError(f"the VAE's loss became {losses[-1]} at step {step}: lower train.lr or train.kl_weight")
            if log is not None and step % 50 == 0:
                elapsed = time.perf_counter() - start
                log(f"step {step}  loss {sum(losses[-50:]) / 50:.4f}  (reconstruction MSE {reconstruction_mse.item():.4f}, "
                    f"KL {kl.item():.3f})  {step * batch_size / elapsed:.0f} img/s")
            reason = _stop_reason(settings, step, epoch, start)
            if reason is not None:
                break
        else:
            epoch += 1
            reason = _stop_reason(settings, step, epoch, start)
    seconds = time.perf_counter() - start
    vae.eval()

    metrics = {"steps": step, "epochs": epoch, "seconds": round(seconds, 1),
               "images_per_second": round(step * batch_size / seconds, 1), "kl_weight": settings.kl_weight}
    metrics.update(_fit_latent_scale(vae, images, settings.seed))
    metrics["reconstruction_mse_train"] = _reconstruction_mse(vae, images)
    held_out = _held_out_images(config)
    if held_out is not None:
        metrics["reconstruction_mse_test"] = _reconstruction_mse(vae, held_out.to(device))
    if out_dir is not None:
        out_dir = Path(out_dir)
        vae.to("cpu").save_pretrained(out_dir)
        shown = held_out if held_out is not None else dataset.images
        _save_reconstructions(vae, _spread(shown), out_dir / RECONSTRUCTIONS_NAME)
        text = json.dumps(metrics, indent=2)
        atomic_write(out_dir / METRICS_NAME, lambda tmp: Path(tmp).write_text(text))
        config.dump(out_dir / TRAINING_CONFIG_NAME)
    return VAETrainResult(vae=vae, steps=step, epochs_completed=epoch, seconds=seconds,
                          reason=reason, losses=losses, metrics=metrics)


def _validate(settings) -> None:
    checks = {
        "batch_size": (settings.batch_size >= 1, "at least 1"),
        "lr": (settings.lr > 0, "positive"),
        "kl_weight": (settings.kl_weight >= 0, "0 or more"),
        "grad_clip": (settings.grad_clip is None or settings.grad_clip > 0, "positive or null"),
        "max_steps": (settings.max_steps is None or settings.max_steps >= 1, "at least 1 or null"),
        "epochs": (settings.epochs is None or settings.epochs >= 1, "at least 1 or null"),
        "max_minutes": (settings.max_minutes is None or settings.max_minutes > 0, "positive or null"),
        "seed": (0 <= settings.seed < 2**64, "in [0, 2**64) (torch wraps a negative seed onto another one)"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"train.{key} must be {expected}, got {getattr(settings, key)!r}")
    if settings.max_steps is None and settings.epochs is None and settings.max_minutes is None:
        raise ValueError("set at least one of train.max_steps, train.epochs or train.max_minutes")


def _stop_reason(settings, step: int, epoch: int, start: float) -> str | None:
    if settings.max_steps is not None and step >= settings.max_steps:
        return "max_steps"
    if settings.epochs is not None and epoch >= settings.epochs:
        return "epochs"
    if settings.max_minutes is not None and time.perf_counter() - start >= 60 * settings.max_minutes:
        return "max_minutes"
    return None


@torch.no_grad()
def _fit_latent_scale(vae, images: torch.Tensor, seed: int) -> dict:
    """latent_scale = 1 / std of the training latents, so the diffusion model sees unit variance
    (Stable Diffusion's scaling_factor, computed here from the data rather than fixed)."""
    vae.latent_scale = 1.0
    generator = torch.Generator().manual_seed(seed)
    latents = torch.cat([vae.encode(chunk, generator=generator).float().cpu()
                         for chunk in images.split(EVALUATION_BATCH_SIZE)])  # [N, c, h, w]
    std = latents.std().item()
    vae.latent_scale = 1.0 / std
    return {"latent_mean": latents.mean().item(), "latent_std": std,
            "latent_scale": vae.latent_scale}


@torch.no_grad()
def _reconstruction_mse(vae, images: torch.Tensor) -> float:
    """Mean squared error of decode(encode(x)) against x, in the data's [-1, 1] units."""
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for chunk in images.split(EVALUATION_BATCH_SIZE):
        total += torch.nn.functional.mse_loss(vae.decode(vae.encode(chunk, generator=generator)), chunk,
                                              reduction="sum").item()
    return round(total / images.numel(), 6)


def _held_out_images(config: VAETrainingConfig) -> torch.Tensor | None:
    """The test split of the configured dataset, when it has one distinct from the training data."""
    data = config.data
    if data.split != "train" or data.dataset == "folder":
        return None
    dataset = load_dataset(data.dataset, root=data.root, image_size=data.image_size, channels=data.channels,
                           split="test")
    return dataset.images


def _spread(images: torch.Tensor, num: int = 10) -> torch.Tensor:
    """``num`` images evenly spaced through the set (the bundled digits' test split is grouped by
    class, so this shows every digit)."""
    stride = max(len(images) // num, 1)
    return images[::stride][:num]


@torch.no_grad()
def _save_reconstructions(vae, originals: torch.Tensor, path: Path) -> None:
    """Two rows: the originals, and below them decode(encode(original))."""
    reconstructions = vae.decode(vae.encode(originals, generator=torch.Generator().manual_seed(0)))
    grid = torch.stack([originals, reconstructions.clamp(-1, 1)])  # [2, N, C, H, W]
    save_labeled_grid((grid + 1) / 2, path, row_labels=["original", "reconstruction"],
                      title="decode(encode(image)) below each original")
