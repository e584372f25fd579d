"""The sampler of a distilled student (``Pipeline.distill``): deterministic DDIM (eta 0) on the
"trailing" chain the student was trained on, so its first step starts at t = T − 1.

Progressive distillation (Salimans & Ho 2022) trains a student to take one DDIM step where its
teacher took two; the chains nest because "trailing" spacing puts step k of n at T·k/n − 1.
"""

from __future__ import annotations

from minild import NoiseSchedule
from minild.training.distill_targets import trailing_timestep

from .common import check_num_inference_steps
from .ddim import DDIMSampler


def trailing_timesteps(num_timesteps: int, num_inference_steps: int) -> list[int]:
    """"Trailing" spacing, floored: T·k/n − 1 for k = n … 1, noisiest first (diffusers rounds
    instead, which breaks the nesting when T·k/n is not an integer).

    4 steps of 1000 give 999, 749, 499, 249; the chain for 2n holds every timestep of the chain for n.
    """
    check_num_inference_steps(num_inference_steps, num_timesteps)
    return [trailing_timestep(num_timesteps, k, num_inference_steps) for k in range(num_inference_steps, 0, -1)]


class DistilledSampler(DDIMSampler):
    """DDIM eq. 12 with η = 0 on ``trailing_timesteps``, ending on the clean image (ᾱ = 1): DDIM's
    ``sample`` and ``step`` on another chain.

    - ``num_inference_steps``: the chain the student was distilled for, which ``sample`` walks when
      given None (default 1); other lengths run, but a student is only trained for its own.
    - ``clip_sample``: as DDIM's (``"none"``, ``"clip"``, ``"clip_rederive_eps"``). At T − 1 the x̂0 of
      an eps-model is (x − σ ε)/α with α ≈ 0.006 on the linear schedule, so a one-step student's ε
      error is magnified some 160×; clamping x̂0 to the data range bounds it (pixel models only).
    """

    def __init__(self, schedule: NoiseSchedule, *, num_inference_steps: int = 1, clip_sample: str = "none"):
        super().__init__(schedule, eta=0.0, final_alpha_cumprod="one", num_inference_steps=num_inference_steps,
                         clip_sample=clip_sample)

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The chain's timesteps, noisiest first: T − 1, …, ⌊T/n⌋ − 1."""
        return trailing_timesteps(self.schedule.num_timesteps, num_inference_steps)
