"""The sampler of a distilled student (``Pipeline.distill``): deterministic DDIM (eta 0) on the
"trailing" chain the student was trained on, so its first step starts at t = T − 1.

Progressive distillation (Salimans & Ho 2022) trains a student to take one DDIM step where its
teacher took two; the chains nest because "trailing" spacing puts step k of n at T·k/n − 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from minild import NoiseSchedule
from minild.training.distill_targets import trailing_timestep

from .common import GeneratorOrList, chain_from, check_default_steps, check_num_inference_steps, initial_latents, run_chain
from .ddim import DDIMSampler


def trailing_timesteps(num_timesteps: int, num_inference_steps: int) -> list[int]:
    """"Trailing" spacing, floored: T·k/n − 1 for k = n … 1, noisiest first (diffusers rounds
    instead, which breaks the nesting when T·k/n is not an integer).

    4 steps of 1000 give 999, 749, 499, 249; the chain for 2n holds every timestep of the chain for n.
    """
    check_num_inference_steps(num_inference_steps, num_timesteps)
    return [trailing_timestep(num_timesteps, k, num_inference_steps) for k in range(num_inference_steps, 0, -1)]


class DistilledSampler:
    """DDIM eq. 12 with η = 0 on ``trailing_timesteps``, ending on the clean image (ᾱ = 1).

    - ``num_inference_steps``: the chain the student was distilled for (``sample`` walks it when
      given None); other lengths run, but a student is only trained for its own.
    """

    def __init__(self, schedule: NoiseSchedule, *, num_inference_steps: int | None = None):
        check_default_steps(num_inference_steps, schedule.num_timesteps)
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self._ddim = DDIMSampler(schedule, eta=0.0, final_alpha_cumprod="one")  # its step is the update rule

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The chain's timesteps, noisiest first: T − 1, …, T/n − 1."""
        return trailing_timesteps(self.schedule.num_timesteps, num_inference_steps)

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
        """Denoise x_T of ``shape`` (B, C, H, W) in ``num_inference_steps`` model evaluations
        (default: the sampler's, else 1). ``start_step`` k walks only the chain's last n − k steps,
        from ``latents`` = x_t at ``timesteps(n)[k]`` (SDEdit)."""
        if num_inference_steps is None:
            num_inference_steps = self.num_inference_steps or 1
        timesteps = chain_from(self.timesteps(num_inference_steps), start_step)
        x = initial_latents(shape, generator, latents, device)
        return run_chain(self, model_fn, x, timesteps, generator, callback)

    @torch.no_grad()
    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor, *, t_prev: int | None,
             generator: GeneratorOrList = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t → x_{t_prev} (``t_prev=None``: the clean image); returns ``(x_prev, x0_pred)``."""
        return self._ddim.step(eps, t, x, t_prev=t_prev, generator=generator)
