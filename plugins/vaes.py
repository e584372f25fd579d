"""Built-in autoencoders for latent diffusion: diffusers' ``AutoencoderKL`` (Stable Diffusion's
VAE) and ``digits_vae``, a small KL-regularised VAE that minild trains itself (``minild train-vae``)."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minild import hookimpl
from minild.io import atomic_write, atomic_write_files, load_weights, save_weights

Posterior = typing.Literal["mode", "sample"]  # what encode() returns: the posterior mean or a draw from it

DIGITS_VAE_CONFIG = "config.json"
DIGITS_VAE_WEIGHTS = "model.safetensors"


class VAEUnavailableError(FileNotFoundError):
    """A VAE's weights or config cannot be found or loaded; the message says what was tried."""


def _check_posterior(name: str, posterior: str) -> None:
    if posterior not in typing.get_args(Posterior):
        raise ValueError(f"{name}: posterior must be 'mode' (the posterior mean) or 'sample', got {posterior!r}")


def _draw(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = μ + σ·ε with ε drawn on the CPU, so a seed gives the same latents on every device."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def _latent_shape(vae, name: str, image_shape, hint: str = "") -> tuple[int, int, int]:
    """The [C, H, W] latents ``vae`` makes of ``image_shape`` images; refuses images of another
    channel count or with sides its downsampling does not divide."""
    channels, height, width = image_shape
    factor = vae.downsample_factor
    if channels != vae.in_channels or height % factor or width % factor:
        raise ValueError(
            f"{name} takes {vae.in_channels}-channel images with sides divisible by {factor}, "
            f"got {tuple(image_shape)}{hint}"
        )
    return (vae.latent_channels, height // factor, width // factor)


# ---------------------------------------------------------------------------
# diffusers' AutoencoderKL
# ---------------------------------------------------------------------------


class AutoencoderKLStage(nn.Module):
    """diffusers' ``AutoencoderKL`` from a local directory or hub id, frozen.

    ``encode``: images ``[B, C, H, W]`` in [-1, 1] → ``(z − shift_factor) · scaling_factor``
    with z the posterior mode (default) or a sample; ``decode`` undoes the scaling and runs the
    decoder. ``scaling_factor`` / ``shift_factor`` default to the ones in the VAE's config
    (0.18215 and none for Stable Diffusion 1.x/2.x, 0.13025 for SDXL).
    """

    def __init__(
        self,
        *,
        pretrained: str,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        posterior: Posterior = "mode",
        device: str = "cpu",
    ):
        super().__init__()
        _check_posterior("autoencoder_kl", posterior)
        self.autoencoder = _load_autoencoder_kl(pretrained, subfolder).to(device).eval().requires_grad_(False)
        config = self.autoencoder.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor)
        shift = shift_factor if shift_factor is not None else getattr(config, "shift_factor", None)
        self.shift_factor = float(shift or 0.0)
        self.posterior = posterior
        self.latent_channels = config.latent_channels
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)  # one stride-2 conv per extra block
        self.in_channels = config.in_channels

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        return _latent_shape(self, "autoencoder_kl", image_shape, hint=": set data.channels / data.image_size to fit")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        distribution = self.autoencoder.encode(images.to(self.autoencoder.dtype)).latent_dist
        if self.posterior == "mode":
            z = distribution.mode()
        else:
            z = _draw(distribution.mean, distribution.logvar, generator)
        return (z.float() - self.shift_factor) * self.scaling_factor  # [B, c, h, w]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z.to(self.autoencoder.dtype)).sample.float()  # [B, C, H, W]

    def save_pretrained(self, directory: str | Path) -> dict:
        """Write the AutoencoderKL (diffusers' format); returns the params that reload it from there."""
        atomic_write_files(directory, self.autoencoder.save_pretrained)
        return {"pretrained": str(directory), "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "posterior": self.posterior, "device": str(self.autoencoder.device)}


def _load_autoencoder_kl(pretrained: str, subfolder: str | None):
    from diffusers import AutoencoderKL

    where = f"{pretrained!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    how = (
        "Pass pretrained= a local directory written by AutoencoderKL.save_pretrained() (config.json and "
        "diffusion_pytorch_model.safetensors), with subfolder='vae' for a whole Stable Diffusion checkout, "
        "or a hub id already in the Hugging Face cache (to download it, run once with network access and "
        "HF_HUB_OFFLINE unset)."
    )
    local = Path(pretrained).expanduser()
    if local.is_dir() and not (local / (subfolder or "") / "config.json").is_file():
        raise VAEUnavailableError(f"cannot load autoencoder_kl from {where}: the directory has no config.json. {how}")
    try:
        return AutoencoderKL.from_pretrained(str(local) if local.is_dir() else pretrained, subfolder=subfolder,
                                             torch_dtype=torch.float32)
    except (OSError, ValueError) as err:  # missing files, offline hub, bad repo id, unreadable config
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VAEUnavailableError(f"cannot load autoencoder_kl from {where} ({reason}). {how}") from err


# ---------------------------------------------------------------------------
# digits_vae: a small VAE trained by minild on 28×28 digits
# ---------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus the input."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class DigitsVAE(nn.Module):
    """A KL-regularised convolutional VAE: ``[B, 1, 28, 28]`` → ``[B, latent_channels, 7, 7]``.

    Encoder: conv to ``base_channels``, then per halving a stride-2 conv and a residual block
    (28 → 14 → 7), and a conv to the posterior's mean and log-variance (2·latent_channels).
    Decoder: the mirror image with nearest upsampling + conv, ending in tanh (images in [-1, 1]).

    ``pretrained``: a directory written by ``save_pretrained`` (``minild train-vae``); its
    ``config.json`` gives the architecture and ``latent_scale``. Without it the VAE is untrained.
    ``latent_scale`` multiplies the encoder's latents (and divides before decoding) so the
    diffusion model sees unit-variance latents; ``minild train-vae`` sets it to 1/std of the
    training latents, like Stable Diffusion's ``scaling_factor``.
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        in_channels: int | None = None,
        latent_channels: int | None = None,
        base_channels: int | None = None,
        num_downsamples: int | None = None,
        norm_groups: int | None = None,
        latent_scale: float | None = None,
        posterior: Posterior = "mode",
    ):
        super().__init__()
        _check_posterior("digits_vae", posterior)
        given = dict(in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
                     num_downsamples=num_downsamples, norm_groups=norm_groups)
        architecture = dict(in_channels=1, latent_channels=4, base_channels=32, num_downsamples=2, norm_groups=8)
        saved_scale = 1.0
        if pretrained is not None:
            saved = read_digits_vae_config(pretrained)
            saved_scale = saved.pop("latent_scale")
            for key, value in given.items():
                if value is not None and value != saved[key]:
                    raise ValueError(
                        f"digits_vae: {key}={value} but the VAE saved in {pretrained} has {key}={saved[key]}; "
                        f"drop {key} from the config (it is read from {DIGITS_VAE_CONFIG})"
                    )
            architecture = saved
        else:
            architecture.update({key: value for key, value in given.items() if value is not None})
        self.architecture = architecture
        self.in_channels = architecture["in_channels"]
        self.latent_channels = architecture["latent_channels"]
        self.downsample_factor = 2 ** architecture["num_downsamples"]
        self.latent_scale = float(latent_scale if latent_scale is not None else saved_scale)
        self.posterior = posterior
        self.encoder, self.decoder = _digits_encoder_decoder(**architecture)
        if pretrained is not None:
            load_weights(self, Path(pretrained) / DIGITS_VAE_WEIGHTS)
        self.eval()

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        return _latent_shape(self, "digits_vae", image_shape)

    def posterior_parameters(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images ``[B, C, H, W]`` in [-1, 1] → (mean, log-variance), each ``[B, c, h, w]``, unscaled."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.posterior_parameters(images)
        z = mean if self.posterior == "mode" else _draw(mean, logvar, generator)
        return z * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.latent_scale)

    def training_losses(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction MSE, KL to N(0, I)), both means per element, for one batch in [-1, 1].

        KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), averaged over the latent elements.
        """
        mean, logvar = self.posterior_parameters(images)
        reconstruction = self.decoder(_draw(mean, logvar, generator))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return F.mse_loss(reconstruction, images), kl

    def save_pretrained(self, directory: str | Path) -> dict:
        """Write ``config.json`` (architecture + latent_scale) and ``model.safetensors``; returns the
        params that reload this VAE from ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self, directory / DIGITS_VAE_WEIGHTS)
        config = {"vae": "digits_vae", **self.architecture, "latent_scale": self.latent_scale}
        atomic_write(directory / DIGITS_VAE_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        return {"pretrained": str(directory), "posterior": self.posterior}


def read_digits_vae_config(directory: str | Path) -> dict:
    """The architecture and ``latent_scale`` saved by ``DigitsVAE.save_pretrained``."""
    path = Path(directory) / DIGITS_VAE_CONFIG
    if not path.is_file():
        raise VAEUnavailableError(
            f"cannot load digits_vae from {str(directory)!r}: {path} does not exist. Train one with "
            "`minild train-vae configs/digits_vae.yaml --out DIR` and pass pretrained: DIR"
        )
    config = json.loads(path.read_text())
    keys = ("in_channels", "latent_channels", "base_channels", "num_downsamples", "norm_groups", "latent_scale")
    missing = [key for key in keys if key not in config]
    if config.get("vae") != "digits_vae" or missing:
        raise VAEUnavailableError(
            f"{path} is not a digits_vae config (missing {', '.join(missing) or 'the vae: digits_vae marker'}); "
            "was the directory written by another VAE?"
        )
    return {key: config[key] for key in keys}


def _digits_encoder_decoder(*, in_channels, latent_channels, base_channels, num_downsamples, norm_groups):
    if base_channels % norm_groups:
        raise ValueError(f"digits_vae: base_channels ({base_channels}) must be divisible by norm_groups ({norm_groups})")
    width = base_channels
    # Residual blocks only below full resolution: at 28×28 they would cost most of the compute.
    encoder = [nn.Conv2d(in_channels, width, 3, padding=1)]
    for _ in range(num_downsamples):
        encoder += [nn.SiLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), ResidualBlock(width, norm_groups)]
    encoder += [nn.GroupNorm(norm_groups, width), nn.SiLU(),
                nn.Conv2d(width, 2 * latent_channels, 3, padding=1)]  # [B, 2c, h, w]: mean, log-variance
    decoder = [nn.Conv2d(latent_channels, width, 3, padding=1), ResidualBlock(width, norm_groups)]
    for level in range(num_downsamples):
        decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        if level < num_downsamples - 1:
            decoder.append(ResidualBlock(width, norm_groups))
    decoder += [nn.GroupNorm(norm_groups, width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


@hookimpl
def register_vaes(register):
    register("autoencoder_kl", AutoencoderKLStage)
    register("digits_vae", DigitsVAE)
