"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep ODE solver on the data
prediction x̂0, good samples in 10–25 steps. Matches diffusers' ``DPMSolverMultistepScheduler``
(algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from minild import NoiseSchedule

from .common import GeneratorOrList, check_choice, check_default_steps, check_num_inference_steps, initial_latents

TIMESTEP_SPACINGS = ("linspace", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers drops to first order in the last steps only for short chains ("lower_order_final").
LOWER_ORDER_FINAL_BELOW = 15


class DPMSolverPPSampler:
    """DPM-Solver++(2M): x_{t_prev} = (σ_prev/σ_t) x_t − α_prev (e^{−h} − 1) (D0 + ½ D1).

    Deterministic: no noise is drawn after x_T.

    - ``timestep_spacing``: ``"linspace"`` (default) walks round(linspace(T−1, 0, n+1))[:-1],
      e.g. 999, 949, …, 50 for 20 of 1000 steps; ``"trailing"`` walks T−1, T−1−T/n, …, T/n−1.
      Both start at t = T−1, where x_T ~ N(0, I) lives. (diffusers' "leading" starts lower and
      is not offered.)
    - ``final_sigmas_type``: ``"zero"`` (default) makes the last step land on σ = 0, i.e. return
      the model's x̂0 of the last timestep; ``"sigma_min"`` stops at the noise level of t = 0.
    - ``num_inference_steps``: the number of steps ``sample`` takes when given None (None: 20).
    """

    def __init__(self, schedule: NoiseSchedule, *, timestep_spacing: str = "linspace", final_sigmas_type: str = "zero",
                 num_inference_steps: int | None = None):
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_default_steps(num_inference_steps, schedule.num_timesteps)
        self.num_inference_steps = num_inference_steps
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        self.schedule = schedule
        self.timestep_spacing = timestep_spacing
        self.final_sigmas_type = final_sigmas_type

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The n training timesteps the chain visits, from T−1 down."""
        num_timesteps = self.schedule.num_timesteps
        check_num_inference_steps(num_inference_steps, num_timesteps)
        if self.timestep_spacing == "linspace":
            # np.round, as diffusers: halves go to even (linspace(0, 999, 21) has 49.95 → 50, 99.9 → 100, …).
            steps = np.linspace(0, num_timesteps - 1, num_inference_steps + 1).round()[::-1][:-1]
        else:
            steps = np.arange(num_timesteps, 0, -num_timesteps / num_inference_steps).round() - 1
        return [int(t) for t in steps]

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

        ``num_inference_steps`` (default: the sampler's, else 20) model evaluations. Without ``latents``, x_T is drawn
        with ``generator`` on ``device`` (default CPU), in float32; nothing else is random.
        """
        if num_inference_steps is None:
            num_inference_steps = self.num_inference_steps or 20
        timesteps = self.timesteps(num_inference_steps)
        x = initial_latents(shape, generator, latents, device)
        n, batch_size = len(timesteps), x.shape[0]

        # Legend (DPM-Solver++ paper, Lu et al. 2022, in the VP parametrisation):
        #   σ̃_t = √((1 − ᾱ_t)/ᾱ_t) the noise-to-signal ratio; α_t = 1/√(1 + σ̃_t²) = √ᾱ_t and
        #   σ_t = σ̃_t α_t = √(1 − ᾱ_t); λ_t = log(α_t/σ_t) the half log-SNR; h = λ_prev − λ_t.
        #   Index i is the step from timesteps[i] to the next level; level n is the end
        #   (σ̃ = 0 with final_sigmas_type "zero": α = 1, σ = 0, λ = ∞).
        # Computed in float32 from σ̃ as diffusers does, so the two agree to rounding.
        alphas_cumprod = self.schedule.alphas_cumprod
        noise_ratio = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # σ̃ for t = 0 … T−1
        final = noise_ratio[0] if self.final_sigmas_type == "sigma_min" else torch.zeros(())
        noise_ratio = torch.cat([noise_ratio[timesteps], final.reshape(1)])  # [n + 1]
        alpha = 1 / (noise_ratio**2 + 1) ** 0.5
        sigma = noise_ratio * alpha
        lambdas = alpha.log() - sigma.log()
        h = lambdas[1:] - lambdas[:-1]  # [n]
        x_coeff = sigma[1:] / sigma[:-1]  # σ_prev/σ_t
        x0_coeff = -alpha[1:] * (torch.exp(-h) - 1.0)  # α_prev (1 − e^{−h})
        # r_i = h_{i−1}/h_i: the previous step's length over this one's (unused at i = 0).
        step_ratio = torch.cat([torch.ones(1), h[:-1] / h[1:]])
        coefficients = (alpha[:-1], sigma[:-1], x_coeff, x0_coeff, step_ratio)
        alpha, sigma, x_coeff, x0_coeff, step_ratio = (c.to(device=x.device, dtype=x.dtype) for c in coefficients)
        t_batches = torch.tensor([[t] * batch_size for t in timesteps], device=x.device)  # [n, B]

        previous_x0 = None
        for i, t in enumerate(timesteps):
            eps = model_fn(x, t_batches[i])
            x0_pred = (x - sigma[i] * eps) / alpha[i]  # the data prediction x̂0 the solver integrates
            if previous_x0 is None or self._first_order(i, n):
                # DPM-Solver++(1), the DDIM step in λ: at σ_prev = 0 it returns x̂0.
                x = x_coeff[i] * x + x0_coeff[i] * x0_pred
            else:
                # DPM-Solver++(2M), Algorithm 2 (midpoint form): D0 = x̂0_i, D1 = (x̂0_i − x̂0_{i−1}) / r_i.
                derivative = (1.0 / step_ratio[i]) * (x0_pred - previous_x0)
                x = x_coeff[i] * x + x0_coeff[i] * x0_pred + 0.5 * x0_coeff[i] * derivative
            previous_x0 = x0_pred
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "x0_pred": x0_pred})
        return x

    def _first_order(self, i: int, n: int) -> bool:
        """diffusers' ``lower_order_final``: the last step is first order when it lands on σ = 0,
        or, with "sigma_min", when the chain is short (< 15 steps)."""
        last = i == n - 1
        return last and (self.final_sigmas_type == "zero" or n < LOWER_ORDER_FINAL_BELOW)
