"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep ODE solver on the data
prediction x̂0, good samples in 10–25 steps. Matches diffusers' ``DPMSolverMultistepScheduler``
(algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from minild import NoiseSchedule

from .common import (
    GeneratorOrList,
    check_choice,
    check_default_steps,
    check_num_inference_steps,
    check_steps_offset,
    chain_from,
    initial_latents,
    run_chain,
)

TIMESTEP_SPACINGS = ("linspace", "trailing", "leading")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers drops to first order in the last steps only for short chains ("lower_order_final").
LOWER_ORDER_FINAL_BELOW = 15


class DPMSolverPPSampler:
    """DPM-Solver++(2M): x_{t_prev} = (σ_prev/σ_t) x_t − α_prev (e^{−h} − 1) (D0 + ½ D1).

    Deterministic: no noise is drawn after x_T.

    - ``timestep_spacing``: ``"linspace"`` (default) walks round(linspace(T−1, 0, n+1))[:-1],
      e.g. 999, 949, …, 50 for 20 of 1000 steps; ``"trailing"`` walks T−1, T−1−T/n, …, T/n−1;
      ``"leading"`` walks k·n, k·(n−1), …, k with k = T//(n+1), each plus ``steps_offset``
      (961, 929, …, 33 for 30 steps with SDXL's offset 1): it starts below T−1 and is offered
      for parity with pipelines configured that way (SDXL).
    - ``steps_offset``: added to the "leading" timesteps (diffusers' ``steps_offset``).
    - ``final_sigmas_type``: ``"zero"`` (default) makes the last step land on σ = 0, i.e. return
      the model's x̂0 of the last timestep; ``"sigma_min"`` stops at the noise level of t = 0.
    - ``num_inference_steps``: the number of steps ``sample`` takes when given None (None: 20).

    ``step`` is multistep: it keeps the previous step's x̂0 and timestep, and ``timesteps(n)``
    starts a new chain.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        timestep_spacing: str = "linspace",
        final_sigmas_type: str = "zero",
        steps_offset: int = 0,
        num_inference_steps: int | None = None,
    ):
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_default_steps(num_inference_steps, schedule.num_timesteps)
        self.num_inference_steps = num_inference_steps
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_steps_offset(steps_offset)
        self.schedule = schedule
        self.timestep_spacing = timestep_spacing
        self.final_sigmas_type = final_sigmas_type
        self.steps_offset = steps_offset
        self._chain_length = 0
        self._previous: tuple[int, torch.Tensor] | None = None  # (t, x̂0) of the chain's last step

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The n training timesteps the chain visits, noisiest first; starts a new chain for ``step``."""
        num_timesteps = self.schedule.num_timesteps
        check_num_inference_steps(num_inference_steps, num_timesteps)
        if self.timestep_spacing == "linspace":
            # np.round, as diffusers: halves go to even (linspace(0, 999, 21) has 49.95 → 50, 99.9 → 100, …).
            steps = np.linspace(0, num_timesteps - 1, num_inference_steps + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "trailing":
            steps = np.arange(num_timesteps, 0, -num_timesteps / num_inference_steps).round() - 1
        else:
            step_ratio = num_timesteps // (num_inference_steps + 1)
            steps = (np.arange(0, num_inference_steps + 1) * step_ratio)[::-1][:-1] + self.steps_offset
        timesteps = [int(t) for t in steps]
        if timesteps[0] >= num_timesteps:
            raise ValueError(
                f"{num_inference_steps} steps with steps_offset={self.steps_offset} start at t={timesteps[0]}, past "
                f"the schedule's last timestep {num_timesteps - 1}; use fewer steps or steps_offset=0"
            )
        self._chain_length, self._previous = len(timesteps), None
        return timesteps

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

        ``num_inference_steps`` (default: the sampler's, else 20) model evaluations. Without ``latents``, x_T is drawn
        with ``generator`` on ``device`` (default CPU), in float32; nothing else is random.
        ``start_step`` k > 0 walks only the chain's last n − k timesteps: ``latents`` is then x_t at
        ``timesteps(n)[k]``, an image noised there (SDEdit), rather than x_T.
        """
        if num_inference_steps is None:
            num_inference_steps = self.num_inference_steps or 20
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
        """One solver step x_t → x_{t_prev} (``None``: the end of the chain) given ``eps`` at (x_t, t).

        Second order when the previous call of this chain ended at ``t``, else first order.
        Returns ``(x_prev, x0_pred)``; ``generator`` is unused (the solver is deterministic).
        """
        # Legend (DPM-Solver++ paper, Lu et al. 2022, in the VP parametrisation):
        #   σ̃_t = √((1 − ᾱ_t)/ᾱ_t) the noise-to-signal ratio; α_t = 1/√(1 + σ̃_t²) = √ᾱ_t and
        #   σ_t = σ̃_t α_t = √(1 − ᾱ_t); λ_t = log(α_t/σ_t) the half log-SNR; h = λ_prev − λ_t.
        #   The end of the chain is σ̃ = 0 with final_sigmas_type "zero" (α = 1, σ = 0, λ = ∞).
        # 0-dim float32 CPU tensors computed from σ̃ as diffusers does, so the two agree to rounding.
        alpha_t, sigma_t, lambda_t = self._levels(t)
        alpha_prev, sigma_prev, lambda_prev = self._levels(t_prev)
        h = lambda_prev - lambda_t
        x_coeff = sigma_prev / sigma_t  # σ_prev/σ_t
        x0_coeff = -alpha_prev * (torch.exp(-h) - 1.0)  # α_prev (1 − e^{−h})
        x0_pred = (x - sigma_t * eps) / alpha_t  # the data prediction x̂0 the solver integrates
        previous = self._previous if self._previous is not None and self._previous[0] == t else None
        if previous is None or self._first_order(t_prev):
            # DPM-Solver++(1), the DDIM step in λ: at σ_prev = 0 it returns x̂0.
            x_next = x_coeff * x + x0_coeff * x0_pred
        else:
            # DPM-Solver++(2M), Algorithm 2 (midpoint form): D0 = x̂0_i, D1 = (x̂0_i − x̂0_{i−1}) / r_i,
            # r_i = h_{i−1}/h_i the previous step's length over this one's.
            _, previous_x0, previous_lambda = previous
            step_ratio = (lambda_t - previous_lambda) / h
            derivative = (1.0 / step_ratio) * (x0_pred - previous_x0)
            x_next = x_coeff * x + x0_coeff * x0_pred + 0.5 * x0_coeff * derivative
        self._previous = (t_prev, x0_pred, lambda_t) if t_prev is not None else None
        return x_next, x0_pred

    def _levels(self, t: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α, σ, λ) at timestep ``t``, or at the end of the chain for ``t=None``."""
        alphas_cumprod = self.schedule.alphas_cumprod
        if t is None:
            t_end = 0 if self.final_sigmas_type == "sigma_min" else None
            if t_end is None:
                return torch.tensor(1.0), torch.tensor(0.0), torch.tensor(float("inf"))
            t = t_end
        noise_ratio = ((1 - alphas_cumprod[t]) / alphas_cumprod[t]) ** 0.5
        alpha = 1 / (noise_ratio**2 + 1) ** 0.5
        sigma = noise_ratio * alpha
        return alpha, sigma, alpha.log() - sigma.log()

    def _first_order(self, t_prev: int | None) -> bool:
        """diffusers' ``lower_order_final``: the last step is first order when it lands on σ = 0,
        or, with "sigma_min", when the chain is short (< 15 steps)."""
        return t_prev is None and (self.final_sigmas_type == "zero" or self._chain_length < LOWER_ORDER_FINAL_BELOW)
