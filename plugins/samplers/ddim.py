"""DDIM sampling (Song et al. 2021, eq. 12) on a strided chain, deterministic at eta = 0.

Matches diffusers' ``DDIMScheduler`` (epsilon prediction, "leading" spacing, its steps_offset and
set_alpha_to_one). ``step`` is one update of the chain, for drivers that own the loop.
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

CLIP_SAMPLE = ("none", "clip", "clip_rederive_eps")
FINAL_ALPHA_CUMPROD = ("one", "first")


class DDIMSampler:
    """DDIM: x_{t_prev} = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev − σ_t²) · ε + σ_t z.

    - ``eta``: η of DDIM eq. 16; 0 is deterministic, 1 has DDPM's posterior variance.
    - ``clip_sample``: ``"none"`` (default; clipping x̂0 while keeping the model's ε breaks
      classifier-free guidance), ``"clip"`` clamps x̂0 to ±``clip_sample_range`` and keeps ε,
      ``"clip_rederive_eps"`` clamps x̂0 and re-derives ε from it (diffusers'
      ``use_clipped_model_output``, GLIDE).
    - ``steps_offset``: added to every timestep of the chain (diffusers' ``steps_offset``;
      Stable Diffusion and SDXL use 1).
    - ``final_alpha_cumprod``: ᾱ_prev of the last step; ``"one"`` ends on the clean image
      (diffusers' ``set_alpha_to_one=True``), ``"first"`` uses ᾱ_0 (``set_alpha_to_one=False``, SDXL).
    - ``num_inference_steps``: the chain length ``sample`` walks when given None (None: 50).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        eta: float = 0.0,
        clip_sample: str = "none",
        clip_sample_range: float = 1.0,
        steps_offset: int = 0,
        final_alpha_cumprod: str = "one",
        num_inference_steps: int | None = None,
    ):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        check_choice("clip_sample", clip_sample, CLIP_SAMPLE)
        check_clip_sample_range(clip_sample_range)
        check_steps_offset(steps_offset)
        check_choice("final_alpha_cumprod", final_alpha_cumprod, FINAL_ALPHA_CUMPROD)
        check_default_steps(num_inference_steps, schedule.num_timesteps)
        self.num_inference_steps = num_inference_steps
        self.schedule = schedule
        self.eta = float(eta)
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.steps_offset = steps_offset
        self.final_alpha_cumprod = final_alpha_cumprod

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

        ``num_inference_steps`` (default: the sampler's, else 50) walks ``self.timesteps(num_inference_steps)``.
        Without ``latents``, x_T is drawn with ``generator`` on ``device`` (default CPU), in
        float32. With eta > 0 each step draws its noise z with ``generator`` too.
        ``start_step`` k > 0 walks only the chain's last n − k timesteps: ``latents`` is then x_t at
        ``timesteps(n)[k]``, an image noised there (SDEdit), rather than x_T.
        """
        if num_inference_steps is None:
            num_inference_steps = self.num_inference_steps or 50
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
        """One step of the chain x_t → x_{t_prev} given the model's ``eps`` at (x_t, t).

        ``t`` and ``t_prev`` are training timesteps (``t_prev=None``: the last step, ending on
        ``final_alpha_cumprod``); ``x`` and ``eps`` are ``[B, C, H, W]``. Returns
        ``(x_prev, x0_pred)``, both shaped like ``x``.
        """
        # Legend: ᾱ_t = alpha_prod_t, ᾱ_prev = alpha_prod_prev, x̂0 = x0_pred (the paper's f_θ),
        # ε = eps, σ_t = std_dev, η = eta. The ᾱ are 0-dim float32 CPU tensors, which torch
        # applies to x on any device as scalars (no host sync).
        alphas_cumprod = self.schedule.alphas_cumprod
        alpha_prod_t = alphas_cumprod[t]
        if t_prev is not None:
            alpha_prod_prev = alphas_cumprod[t_prev]
        else:
            alpha_prod_prev = torch.tensor(1.0) if self.final_alpha_cumprod == "one" else alphas_cumprod[0]
        beta_prod_t = 1 - alpha_prod_t

        # 1. "predicted x_0" (DDIM eq. 12), optionally clipped
        x0_pred = (x - beta_prod_t.sqrt() * eps) / alpha_prod_t.sqrt()
        if self.clip_sample != "none":
            x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.clip_sample == "clip_rederive_eps":
            eps = (x - alpha_prod_t.sqrt() * x0_pred) / beta_prod_t.sqrt()
        # 2. σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (DDIM eq. 16)
        variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
        std_dev = self.eta * variance.sqrt()
        # 3. DDIM eq. 12: √ᾱ_prev · x̂0 + "direction pointing to x_t" + σ_t z
        x_prev = alpha_prod_prev.sqrt() * x0_pred + (1 - alpha_prod_prev - std_dev**2).sqrt() * eps
        if self.eta > 0:
            x_prev = x_prev + std_dev * randn(x.shape, generator, x.device, x.dtype)
        return x_prev, x0_pred
