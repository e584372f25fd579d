"""Euler-ancestral sampling (Karras et al. 2022, Alg. 2 with ancestral noise; k-diffusion's
``sample_euler_ancestral``) for an eps-model trained on a discrete DDPM schedule.

Matches diffusers' ``EulerAncestralDiscreteScheduler`` with ``timestep_spacing="leading"`` and its steps_offset.
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
    ``steps_offset`` is added to every timestep (diffusers' ``steps_offset``; SDXL uses 1).

    Besides ``sample``, it offers minild's step-wise interface (``timesteps``, ``step``), so it
    drives diffusers pipelines as ``minild:euler_ancestral``; its state is the VE state, so it
    also tells the driver ``state_scale(t)`` = √(σ_t² + 1), the state's scale over x_t.
    """

    def __init__(self, schedule, *, eta: float = 1.0, steps_offset: int = 0):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"euler_ancestral: eta must be a number in [0, 1], got {eta!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"euler_ancestral: steps_offset must be an integer >= 0, got {steps_offset!r}")
        self.schedule = schedule
        self.eta = float(eta)
        self.steps_offset = steps_offset

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """T//n·(n−1), …, T//n, 0, each plus ``steps_offset``: the chain, noisiest first."""
        return leading_timesteps(self.schedule.num_timesteps, num_inference_steps, self.steps_offset)

    def sigma(self, t: int | None) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t) as a 0-dim float32 tensor; 0 past the end of the chain (``t=None``)."""
        if t is None:
            return torch.zeros(())
        alpha_prod = self.schedule.alphas_cumprod[t]
        return ((1 - alpha_prod) / alpha_prod) ** 0.5

    def state_scale(self, t: int) -> torch.Tensor:
        """The VE state at t is √(σ_t² + 1) · x_t."""
        return (self.sigma(t) ** 2 + 1) ** 0.5

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

        ``num_inference_steps`` (default 30) walks ``self.timesteps(num_inference_steps)``. Without
        ``latents``, x_T is drawn with ``generator`` on ``device`` (default CPU), in float32; the
        loop runs on the device and in the dtype of x_T. The callback's ``x`` is the state in the
        model's (DDPM) scale after the step.
        """
        num_inference_steps = 30 if num_inference_steps is None else num_inference_steps
        timesteps = self.timesteps(num_inference_steps)
        x_T = initial_latents(shape, generator, latents, device)
        x = x_T * self.state_scale(timesteps[0])  # VE state at σ_max
        t_batches = torch.tensor(timesteps, device=x.device)[:, None].expand(-1, x.shape[0])  # [n, B]

        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            eps = model_fn(x / self.state_scale(t), t_batches[i])
            x, x0_pred = self.step(eps, t, x, t_prev=t_prev, generator=generator)
            if callback is not None:
                scale = self.state_scale(t_prev) if t_prev is not None else 1.0
                callback({"i": i, "t": t, "x": x / scale, "x0_pred": x0_pred})
        return x

    @torch.no_grad()
    def step(self, eps, t: int, x, *, t_prev: int | None, generator: GeneratorOrList = None):
        """One Euler-ancestral step of the VE state ``x`` from σ_t to σ_{t_prev} (0 for ``None``).

        Noise is drawn with ``generator`` at every step with t > 0. Returns ``(x_prev, x0_pred)``.
        """
        sigma, sigma_next = self.sigma(t), self.sigma(t_prev)
        x0_pred = x - sigma * eps
        # Split the move to σ_next into a deterministic part down to σ_down and fresh
        # noise of std σ_up, with σ_down² + σ_up² = σ_next² (k-diffusion's get_ancestral_step).
        sigma_up = self.eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0_pred) / sigma  # dx/dσ of the probability-flow ODE
        x_prev = x + derivative * (sigma_down - sigma)  # Euler step from σ to σ_down
        if t > 0:
            x_prev = x_prev + sigma_up * randn(x.shape, generator, x.device, x.dtype)
        return x_prev, x0_pred


def leading_timesteps(num_timesteps: int, num_inference_steps: int, steps_offset: int = 0) -> list[int]:
    """T//n·(n−1), …, T//n, 0, each plus ``steps_offset`` (diffusers' "leading" spacing)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"euler_ancestral: num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_timesteps:
        raise ValueError(
            f"euler_ancestral: num_inference_steps must lie in [1, {num_timesteps}], got {num_inference_steps}"
        )
    step_ratio = num_timesteps // num_inference_steps
    timesteps = [i * step_ratio + steps_offset for i in reversed(range(num_inference_steps))]
    if timesteps[0] >= num_timesteps:
        raise ValueError(
            f"euler_ancestral: {num_inference_steps} steps with steps_offset={steps_offset} start past the "
            f"schedule's last timestep {num_timesteps - 1}; use fewer steps or steps_offset=0"
        )
    return timesteps


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
