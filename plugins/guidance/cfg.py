"""Classifier-free guidance (Ho & Salimans 2022) in diffusers' convention."""

from __future__ import annotations

import torch

from minild.pipeline.guidance import Guidance


class ClassifierFreeGuidance(Guidance):
    """ε̃ = ε_u + s · (ε_c − ε_u).

    ``scale`` s: 1 is the plain conditional model (no unconditional pass), 0 the unconditional
    one (no conditional pass); the paper's (1 + w) ε_c − w ε_u has w = s − 1.
    """

    def __init__(self, *, scale: float = 3.0):
        super().__init__(scale=scale)

    def needs_cond(self, t: int) -> bool:
        return self.scale != 0.0

    def __call__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, *, t: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        return eps_uncond + self.scale * (eps_cond - eps_uncond)
