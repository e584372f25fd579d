"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), optionally on a strided chain.

Matches diffusers' ``DDPMScheduler`` (epsilon prediction, "leading" spacing) step for step.
"""

from __future__ import annotations

from typing import Callable

import torch

from minild import NoiseSchedule
from .common import (
    GeneratorOrList,
    check_choice,
    check_default_steps,
    check_clip_sample_range,
    initial_latents,
    leading_timesteps,
    randn,
)

VARIANCE_TYPES = ("fixed_small", "fixed_large")
CLIP_SAMPLE = ("clip", "none")


class DDPMSampler:
    """Ancestral sampler: x_{t−1} ~ N(μ̃_t(x_t, x̂0), σ_t² I).

    - ``variance_type``: ``"fixed_small"`` σ_t² = β̃_t, the posterior variance (DDPM eq. 7);
      ``"fixed_large"`` σ_t² = β_t.
    - ``clip_sample``: ``"clip"`` clamps x̂0 to ±``clip_sample_range`` before the mean is taken
      (images live in [-1, 1]); ``"none"`` leaves it.
    - ``num_inference_steps``: the chain length ``sample`` walks when given None (None: all T steps).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        variance_type: str = "fixed_small",
        clip_sample: str = "clip",
        clip_sample_range: float = 1.0,
        num_inference_steps: int | None = None,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_default_steps(num_inference_steps, schedule.num_timesteps)
        self.num_inference_steps = num_inference_steps
        check_choice("clip_sample", clip_sample, CLIP_SAMPLE)
        check_clip_sample_range(clip_sample_range)
        self.schedule = schedule
        self.variance_type = variance_type
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

        ``num_inference_steps`` (default: the sampler's, else every one of the T training steps) walks the
        timesteps T//n·(n−1), …, T//n, 0, each step jumping to the next one. Without
        ``latents``, x_T is drawn with ``generator`` on ``device`` (default CPU), in float32.
        """
        num_timesteps = self.schedule.num_timesteps
        if num_inference_steps is None:
            num_inference_steps = self.num_inference_steps or num_timesteps
        timesteps = leading_timesteps(num_timesteps, num_inference_steps)
        x = initial_latents(shape, generator, latents, device)
        batch_size = x.shape[0]

        # Legend, one entry per step of the chain t → t_prev (t_prev is the next timestep, −1 after 0):
        #   ᾱ_t = alpha_prod_t, ᾱ_prev = alpha_prod_prev (1 past the end),
        #   α_t = ᾱ_t/ᾱ_prev and β_t = 1 − α_t of this (possibly strided) step,
        #   x̂0 = x0_pred, ε = eps, σ_t = std_dev.
        # α_t is taken from the ᾱ ratio, not the stored β_t, as diffusers does: bit-exact parity.
        alphas_cumprod = self.schedule.alphas_cumprod
        alpha_prod_t = alphas_cumprod[timesteps]  # [n]
        alpha_prod_prev = torch.cat([alphas_cumprod[timesteps[1:]], torch.ones(1)])  # [n]
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        current_alpha_t = alpha_prod_t / alpha_prod_prev
        current_beta_t = 1 - current_alpha_t
        # Posterior mean μ̃_t = x0_coeff · x̂0 + xt_coeff · x_t   (DDPM eq. 7)
        x0_coeff = alpha_prod_prev.sqrt() * current_beta_t / beta_prod_t
        xt_coeff = current_alpha_t.sqrt() * beta_prod_prev / beta_prod_t
        if self.variance_type == "fixed_small":
            variance = beta_prod_prev / beta_prod_t * current_beta_t  # β̃_t   (DDPM eq. 7)
        else:
            variance = current_beta_t  # β_t
        coefficients = (alpha_prod_t.sqrt(), beta_prod_t.sqrt(), x0_coeff, xt_coeff, variance.sqrt())
        sqrt_alpha_prod_t, sqrt_beta_prod_t, x0_coeff, xt_coeff, std_dev = (
            c.to(device=x.device, dtype=x.dtype) for c in coefficients
        )
        t_batches = torch.tensor([[t] * batch_size for t in timesteps], device=x.device)  # [n, B]

        for i, t in enumerate(timesteps):
            eps = model_fn(x, t_batches[i])
            x0_pred = (x - sqrt_beta_prod_t[i] * eps) / sqrt_alpha_prod_t[i]  # DDPM eq. 15
            if self.clip_sample == "clip":
                x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)
            # μ̃_t through x̂0 equals DDPM eq. 11, 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε), when x̂0 is unclipped.
            x = x0_coeff[i] * x0_pred + xt_coeff[i] * x
            if t > 0:
                x = x + std_dev[i] * randn(x.shape, generator, x.device, x.dtype)  # x_{t−1} = μ̃_t + σ_t z
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "x0_pred": x0_pred})
        return x
