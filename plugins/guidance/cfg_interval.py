"""Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval improves sample and distribution quality in diffusion models")."""

from __future__ import annotations

import math

import torch

from minild.pipeline.guidance import Guidance, check_number


class IntervalGuidance(Guidance):
    """CFG only while the noise level σ_t lies in (``sigma_low``, ``sigma_high``]; the plain
    conditional model (one pass, no unconditional forward) outside it:

        D̃(x; σ) = D_u + s (D_c − D_u)   if σ_lo < σ ≤ σ_hi,   else D_c        (paper, eq. 4)

    σ is EDM's noise level; for a DDPM schedule σ_t = √((1 − ᾱ_t)/ᾱ_t), since
    x_t/√ᾱ_t = x_0 + σ_t ε. The guided eps is ε_u + s (ε_c − ε_u), which is the same mix of
    D = x_0-predictions at a fixed x_t. The defaults are the paper's interval for EDM2-S on
    ImageNet-512, (0.28, 5.42]: no guidance at the highest noise levels (where it only pulls
    samples towards the class mean and costs diversity) nor at the lowest (where it does little).
    ``sigma_high: .inf`` (YAML) guides at every noise level above ``sigma_low``.
    """

    uncond_depends_on_t = True

    def __init__(self, *, scale: float = 3.0, sigma_low: float = 0.28, sigma_high: float = 5.42):
        super().__init__(scale=scale)
        sigma_low = check_number(sigma_low, "cfg_interval sigma_low")
        if sigma_high != math.inf:  # inf: guide at every noise level above sigma_low
            sigma_high = check_number(sigma_high, "cfg_interval sigma_high")
        if not 0.0 <= sigma_low < sigma_high:
            raise ValueError(
                f"cfg_interval needs 0 <= sigma_low < sigma_high, got sigma_low={sigma_low}, sigma_high={sigma_high}"
            )
        self.sigma_low, self.sigma_high = sigma_low, sigma_high
        self.reset()  # unbound: no schedule yet

    def reset(self) -> None:
        self.sigma_values = self.sigmas.tolist() if self.sigmas is not None else None

    def in_interval(self, t: int) -> bool:
        if self.sigma_values is None:
            raise ValueError("cfg_interval needs the noise schedule: bind it with guidance.bind(schedule)")
        return self.sigma_low < self.sigma_values[t] <= self.sigma_high

    def needs_uncond(self, t: int) -> bool:
        return self.scale != 1.0 and self.in_interval(t)

    def __call__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, *, t: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        # Called only inside the interval when the pipeline drives it; per sample here for any t.
        sigma = self.schedule_values(self.sigmas, t, eps_cond)  # [B, 1, 1, 1]
        inside = (sigma > self.sigma_low) & (sigma <= self.sigma_high)
        guided = eps_uncond + self.scale * (eps_cond - eps_uncond)
        return torch.where(inside, guided, eps_cond)

    def __repr__(self) -> str:
        return f"IntervalGuidance(scale={self.scale}, sigma_low={self.sigma_low}, sigma_high={self.sigma_high})"
