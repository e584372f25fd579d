"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), optionally on a strided chain.

Matches diffusers' ``DDPMScheduler`` (epsilon prediction, "leading" spacing, its steps_offset) step for
step. ``step`` is one update of the chain, for drivers that own the loop.
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
    check_steps_offset,
    chain_from,
    initial_latents,
    run_chain,
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
    - ``steps_offset``: added to every timestep of the chain (diffusers' ``steps_offset``;
      Stable Diffusion and SDXL use 1). The last step always ends on the clean sample (ᾱ = 1).
    - ``num_inference_steps``: the chain length ``sample`` walks when given None (None: all T steps).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        variance_type: str = "fixed_small",
        clip_sample: str = "clip",
        clip_sample_range: float = 1.0,
        steps_offset: int = 0,
        num_inference_steps: int | None = None,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_default_steps(num_inference_steps, schedule.num_timesteps)
        self.num_inference_steps = num_inference_steps
        check_choice("clip_sample", clip_sample, CLIP_SAMPLE)
        check_clip_sample_range(clip_sample_range)
        check_steps_offset(steps_offset)
        self.schedule = schedule
        self.variance_type = variance_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.steps_offset = steps_offset

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The chain's timesteps, noisiest first: T//n·(n−1), …, T//n, 0, each plus ``steps_offset``."""
        return leading_timesteps(self.schedule.num_timesteps, num_inference_steps, self.steps_offset)

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
        start_step: int = 0,
    ) -> torch.Tensor:
        """Denoise x_T of ``shape`` (B, C, H, W) into x_0 with ``model_fn(x, t) -> eps``.

        ``num_inference_steps`` (default: the sampler's, else every one of the T training steps)
        walks ``self.timesteps(num_inference_steps)``, each step jumping to the next one. Without
        ``latents``, x_T is drawn with ``generator`` on ``device`` (default CPU), in float32.
        ``start_step`` k > 0 walks only the chain's last n − k timesteps: ``latents`` is then x_t at
        ``timesteps(n)[k]``, an image noised there (SDEdit), rather than x_T.
        """
        if num_inference_steps is None:
            num_inference_steps = self.num_inference_steps or self.schedule.num_timesteps
        timesteps = chain_from(self.timesteps(num_inference_steps), start_step)
        x = initial_latents(shape, generator, latents, device)
        # Each step: ε = model_fn(x_t, t), then self.step to the next timestep (common.run_chain).
        return run_chain(self, model_fn, x, timesteps, generator, callback)

    @torch.no_grad()
    def step(
        self,
        eps: torch.Tensor,
        t: int,
        x: torch.Tensor,
        *,
        t_prev: int | None,
        generator: GeneratorOrList = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t → x_{t_prev} given the model's ``eps`` at (x_t, t).

        ``t_prev=None`` is the last step, onto ᾱ = 1. Noise is drawn with ``generator`` whenever
        t > 0 (as diffusers does, even where σ_t is 0). Returns ``(x_prev, x0_pred)``.
        """
        # Legend for the step t → t_prev: ᾱ_t = alpha_prod_t, ᾱ_prev = alpha_prod_prev (1 past the end),
        #   α_t = ᾱ_t/ᾱ_prev and β_t = 1 − α_t of this (possibly strided) step, x̂0 = x0_pred, ε = eps.
        # α_t is taken from the ᾱ ratio, not the stored β_t, as diffusers does: bit-exact parity.
        # The coefficients are 0-dim CPU tensors, applied to x on any device as scalars (no host sync).
        alphas_cumprod = self.schedule.alphas_cumprod
        alpha_prod_t = alphas_cumprod[t]
        alpha_prod_prev = alphas_cumprod[t_prev] if t_prev is not None else torch.tensor(1.0)
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        current_alpha_t = alpha_prod_t / alpha_prod_prev
        current_beta_t = 1 - current_alpha_t

        x0_pred = (x - beta_prod_t.sqrt() * eps) / alpha_prod_t.sqrt()  # DDPM eq. 15
        if self.clip_sample == "clip":
            x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)
        # Posterior mean μ̃_t = x0_coeff · x̂0 + xt_coeff · x_t (DDPM eq. 7); through x̂0 it equals
        # DDPM eq. 11, 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε), when x̂0 is unclipped.
        x0_coeff = alpha_prod_prev.sqrt() * current_beta_t / beta_prod_t
        xt_coeff = current_alpha_t.sqrt() * beta_prod_prev / beta_prod_t
        x_prev = x0_coeff * x0_pred + xt_coeff * x
        if t > 0:
            if self.variance_type == "fixed_small":
                variance = (beta_prod_prev / beta_prod_t * current_beta_t).clamp(min=1e-20)  # β̃_t (DDPM eq. 7)
            else:
                variance = current_beta_t  # β_t
            x_prev = x_prev + variance.sqrt() * randn(x.shape, generator, x.device, x.dtype)  # + σ_t z
        return x_prev, x0_pred
