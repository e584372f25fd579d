"""A latent pipeline's VAE trained on first use: when ``vae.pretrained`` holds no VAE yet and the
config names a ``vae_training`` config, that VAE is trained into ``vae.pretrained`` before the
diffusion model, so one ``minild train`` command builds the whole latent pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from minild import plugins
from minild.config import PipelineConfig, load_vae_training_config

SAVED_VAE_MARKER = "config.json"  # what a saved VAE directory holds (digits_vae and diffusers' AutoencoderKL)


def vae_to_train(config: PipelineConfig) -> Path | None:
    """``vae.pretrained`` when the config would train its VAE there first (it names a
    ``vae_training`` config and the directory holds no saved VAE), else None."""
    if config.vae is None or config.vae_training is None:
        return None
    pretrained = config.vae.params.get("pretrained")
    if not isinstance(pretrained, str):
        raise ValueError(
            f"vae_training: {config.vae_training} needs vae.pretrained, the directory to train the VAE into "
            "and read it from (e.g. pretrained: runs/digits-vae)"
        )
    directory = Path(pretrained)
    return None if (directory / SAVED_VAE_MARKER).is_file() else directory


def ensure_vae(config: PipelineConfig, *, config_path: str | Path | None = None, max_steps: int | None = None,
               device: str | None = None, log: Callable[[str], None] | None = None) -> Path | None:
    """Train the config's VAE into ``vae.pretrained`` if it is not there yet; returns that directory
    when it trained one, None when there was nothing to do.

    ``config_path``: the pipeline config's file, whose directory is the second place a relative
    ``vae_training`` path is looked for. ``max_steps`` / ``device`` override the VAE config's
    ``train.max_steps`` / ``train.device`` (a quick check of the whole chain). Everything that
    would make the VAE unfit for the diffusion model (another VAE, other data, another number of
    latent channels than ``model.in_channels``) is refused before any training."""
    directory = vae_to_train(config)
    if directory is None:
        return None
    source = _find_vae_training(config.vae_training, config_path)
    vae_config = load_vae_training_config(source)
    _check_fits(config, vae_config, source)
    if max_steps is not None:
        vae_config.train.max_steps = max_steps
    if device is not None:
        vae_config.train.device = device
    if log is not None:
        budget = _budget(vae_config.train)
        log(f"vae.pretrained {directory} holds no VAE yet: training one first with {source} ({budget}), then the "
            "diffusion model")
    from minild.training.vae import train_vae  # imports the trainer, only needed here

    result = train_vae(vae_config, directory, log=log)
    if log is not None:
        log(f"trained the VAE {result.steps} steps in {result.seconds:.0f}s (stopped by {result.reason}); reconstruction "
            f"MSE on held-out digits {result.metrics.get('reconstruction_mse_test', float('nan')):.5f}; saved to {directory}")
    return directory


def _find_vae_training(path: str, config_path: str | Path | None) -> Path:
    candidates = [Path(path)]
    if config_path is not None and not Path(path).is_absolute():
        candidates.append(Path(config_path).parent / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"vae_training: {path} does not exist (tried {tried}); give the path of a `minild train-vae` config "
        "such as configs/digits_vae.yaml"
    )


def _check_fits(config: PipelineConfig, vae_config, source: Path) -> None:
    if vae_config.vae.name != config.vae.name:
        raise ValueError(
            f"vae_training {source} trains a {vae_config.vae.name!r} VAE but the pipeline's vae is "
            f"{config.vae.name!r}: make vae.name the same in both"
        )
    if vae_config.data.dataset != config.data.dataset:
        raise ValueError(
            f"vae_training {source} trains on data.dataset {vae_config.data.dataset!r} but the pipeline trains on "
            f"{config.data.dataset!r}: train the VAE on the data it will encode"
        )
    untrained = plugins.create("vae", vae_config.vae.name, **vae_config.vae.params)  # milliseconds: no weights read
    in_channels = config.model.params.get("in_channels")
    if in_channels is not None and in_channels != untrained.latent_channels:
        raise ValueError(
            f"vae_training {source} trains a VAE with {untrained.latent_channels}-channel latents but model.in_channels "
            f"is {in_channels}: set model.in_channels: {untrained.latent_channels}, or vae.latent_channels: {in_channels} "
            f"in {source}"
        )


def _budget(train) -> str:
    limits = []
    if train.max_steps is not None:
        limits.append(f"at most {train.max_steps} steps")
    if train.max_minutes is not None:
        limits.append(f"at most {train.max_minutes:g} minutes")
    if train.epochs is not None:
        limits.append(f"at most {train.epochs} epochs")
    return ", ".join(limits)
