"""Euler-ancestral sampling (Karras et al. 2022, Alg. 2 with ancestral noise; k-diffusion's
``sample_euler_ancestral``) for an eps-model trained on a discrete DDPM schedule.

Matches diffusers' ``EulerAncestralDiscreteScheduler`` with ``timestep_spacing="leading"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

GeneratorOrList = torch.Generator | Sequence[torch.Generator] | None


class EulerAncestralSampler:
    """Euler steps on the variance-exploding ODE in σ, with fresh noise after every step.

    A DDPM state x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε is, divided by √ᾱ_t, the VE state
    x = x0 + σ_t ε with σ_t = √((1 − ᾱ_t)/ᾱ_t); the model sees x / √(σ² + 1) = x_t.
    ``eta`` scales the ancestral noise: 1 is the usual sampler, 0 plain (deterministic) Euler.
    """

    def __init__(self, schedule, *, eta: float = 1.0):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"euler_ancestral: eta must be a number in [0, 1], got {eta!r}")
        self.schedule = schedule
        self.eta = float(eta)

    def sigmas(self, timesteps: list[int]) -> torch.Tensor:
        """σ at each timestep, then 0: ``[n + 1]`` float32."""
        alphas_cumprod = self.schedule.alphas_cumprod
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # [T]
        return torch.cat([sigmas[timesteps], torch.zeros(1)])

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
        """Denoise standard-normal x_T of ``shape`` (B, C, H, W) with ``model_fn(x, t) -> eps``.

        ``num_inference_steps`` (default 30) walks T//n·(n−1), …, T//n, 0. Without ``latents``,
        x_T is drawn with ``generator`` on ``device`` (default CPU), in float32; the loop runs on
        the device and in the dtype of x_T. The callback's ``x`` is the state in the model's
        (DDPM) scale after the step.
        """
        num_inference_steps = 30 if num_inference_steps is None else num_inference_steps
        timesteps = leading_timesteps(self.schedule.num_timesteps, num_inference_steps)
        x_T = initial_latents(shape, generator, latents, device)
        sigmas = self.sigmas(timesteps).to(device=x_T.device, dtype=x_T.dtype)  # [n + 1]
        x = x_T * (sigmas[0] ** 2 + 1) ** 0.5  # VE state at σ_max
        t_batches = torch.tensor(timesteps, device=x.device)[:, None].expand(-1, x.shape[0])  # [n, B]

        for i, t in enumerate(timesteps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            eps = model_fn(x / (sigma**2 + 1) ** 0.5, t_batches[i])
            x0_pred = x - sigma * eps
            # Split the move to σ_next into a deterministic part down to σ_down and fresh
            # noise of std σ_up, with σ_down² + σ_up² = σ_next² (k-diffusion's get_ancestral_step).
            sigma_up = self.eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            derivative = (x - x0_pred) / sigma  # dx/dσ of the probability-flow ODE
            x = x + derivative * (sigma_down - sigma)  # Euler step from σ to σ_down
            if t > 0:
                x = x + sigma_up * randn(x.shape, generator, x.device, x.dtype)
            if callback is not None:
                callback({"i": i, "t": t, "x": x / (sigma_next**2 + 1) ** 0.5, "x0_pred": x0_pred})
        return x


def leading_timesteps(num_timesteps: int, num_inference_steps: int) -> list[int]:
    """T//n·(n−1), …, T//n, 0 (diffusers' "leading" spacing, ``steps_offset=0``)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"euler_ancestral: num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_timesteps:
        raise ValueError(
            f"euler_ancestral: num_inference_steps must lie in [1, {num_timesteps}], got {num_inference_steps}"
        )
    step_ratio = num_timesteps // num_inference_steps
    return [i * step_ratio for i in reversed(range(num_inference_steps))]


def randn(shape, generator: GeneratorOrList, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU by default), one generator per sample if a list."""
    if isinstance(generator, Sequence):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]).to(device)
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype).to(device)


def initial_latents(shape, generator: GeneratorOrList, latents: torch.Tensor | None, device) -> torch.Tensor:
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"euler_ancestral: shape must be (B, C, H, W) of positive integers, got {shape}")
    if isinstance(generator, Sequence) and len(generator) != shape[0]:
        raise ValueError(f"euler_ancestral: got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(f"euler_ancestral: latents have shape {tuple(latents.shape)} but shape is {shape}")
        return latents
    return randn(shape, generator, torch.device(device or "cpu"), torch.float32)
