"""DDIM sampling (Song et al. 2021, eq. 12) on a strided chain, deterministic at eta = 0.

Matches diffusers' ``DDIMScheduler`` (epsilon prediction, "leading" spacing, set_alpha_to_one).
"""

from __future__ import annotations

from typing import Callable

import torch

from minild import NoiseSchedule

from .common import (
    GeneratorOrList,
    check_choice,
    check_clip_sample_range,
    initial_latents,
    leading_timesteps,
    randn,
)

CLIP_SAMPLE = ("none", "clip", "clip_rederive_eps")


class DDIMSampler:
    """DDIM: x_{t_prev} = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev − σ_t²) · ε + σ_t z.

    - ``eta``: η of DDIM eq. 16; 0 is deterministic, 1 has DDPM's posterior variance.
    - ``clip_sample``: ``"none"`` (default; clipping x̂0 while keeping the model's ε breaks
      classifier-free guidance), ``"clip"`` clamps x̂0 to ±``clip_sample_range`` and keeps ε,
      ``"clip_rederive_eps"`` clamps x̂0 and re-derives ε from it (diffusers'
      ``use_clipped_model_output``, GLIDE).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        eta: float = 0.0,
        clip_sample: str = "none",
        clip_sample_range: float = 1.0,
    ):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        check_choice("clip_sample", clip_sample, CLIP_SAMPLE)
        check_clip_sample_range(clip_sample_range)
        self.schedule = schedule
        self.eta = float(eta)
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        *,
        num_inference_steps: int | None = None,
        generator: GeneratorOrList = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Denoise x_T of ``shape`` (B, C, H, W) into x_0 with ``model_fn(x, t) -> eps``.

        ``num_inference_steps`` (default 50) walks the timesteps T//n·(n−1), …, T//n, 0.
        Without ``latents``, x_T is drawn with ``generator`` on ``device`` (default CPU), in
        float32. With eta > 0 each step draws its noise z with ``generator`` too.
        """
        if num_inference_steps is None:
            num_inference_steps = 50
        timesteps = leading_timesteps(self.schedule.num_timesteps, num_inference_steps)
        x = initial_latents(shape, generator, latents, device)
        batch_size = x.shape[0]

        # Legend, one entry per step of the chain t → t_prev (t_prev is the next timestep):
        #   ᾱ_t = alpha_prod_t, ᾱ_prev = alpha_prod_prev (1 after the last step: set_alpha_to_one),
        #   x̂0 = x0_pred (the paper's f_θ), ε = eps, σ_t = std_dev, η = eta.
        alphas_cumprod = self.schedule.alphas_cumprod
        alpha_prod_t = alphas_cumprod[timesteps]  # [n]
        alpha_prod_prev = torch.cat([alphas_cumprod[timesteps[1:]], torch.ones(1)])  # [n]
        beta_prod_t = 1 - alpha_prod_t
        # σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (DDIM eq. 16)
        variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
        std_dev = self.eta * variance.sqrt()
        direction_coeff = (1 - alpha_prod_prev - std_dev**2).sqrt()
        coefficients = (alpha_prod_t.sqrt(), beta_prod_t.sqrt(), alpha_prod_prev.sqrt(), direction_coeff, std_dev)
        sqrt_alpha_prod_t, sqrt_beta_prod_t, sqrt_alpha_prod_prev, direction_coeff, std_dev = (
            c.to(device=x.device, dtype=x.dtype) for c in coefficients
        )
        t_batches = torch.tensor([[t] * batch_size for t in timesteps], device=x.device)  # [n, B]

        for i, t in enumerate(timesteps):
            eps = model_fn(x, t_batches[i])
            x0_pred = (x - sqrt_beta_prod_t[i] * eps) / sqrt_alpha_prod_t[i]  # "predicted x_0", DDIM eq. 12
            if self.clip_sample != "none":
                x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)
            if self.clip_sample == "clip_rederive_eps":
                eps = (x - sqrt_alpha_prod_t[i] * x0_pred) / sqrt_beta_prod_t[i]
            # DDIM eq. 12: √ᾱ_prev · x̂0 + "direction pointing to x_t" + σ_t z
            x = sqrt_alpha_prod_prev[i] * x0_pred + direction_coeff[i] * eps
            if self.eta > 0:
                x = x + std_dev[i] * randn(x.shape, generator, x.device, x.dtype)
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "x0_pred": x0_pred})
        return x
