"""CFG with its standard deviation rescaled (Lin et al. 2024, "Common diffusion noise schedules
and sample steps are flawed", section 3.4; diffusers' ``guidance_rescale``)."""

from __future__ import annotations

import torch

from minild.pipeline.guidance import Guidance, check_number


class RescaledGuidance(Guidance):
    """x_cfg = x_u + s (x_c − x_u);  x_rescaled = x_cfg · std(x_c)/std(x_cfg);
    x_final = φ · x_rescaled + (1 − φ) · x_cfg                                     (paper, eq. 15–17)

    The std is taken per sample over all of C, H, W. High scales inflate the std of the
    guided prediction, which over-exposes images; rescaling brings it back to the conditional
    prediction's, and ``phi`` φ (0.7 in the paper) keeps some of the plain CFG result against
    over-smoothing. The paper works on v-predictions; like diffusers, this rescales eps.
    """

    def __init__(self, *, scale: float = 3.0, phi: float = 0.7):
        super().__init__(scale=scale)
        phi = check_number(phi, "cfg_rescale phi")
        if not 0.0 <= phi <= 1.0:
            raise ValueError(f"cfg_rescale phi must lie in [0, 1] (0 = plain CFG), got {phi}")
        self.phi = phi

    def __call__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, *, t: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        guided = eps_uncond + self.scale * (eps_cond - eps_uncond)  # x_cfg
        dims = list(range(1, eps_cond.ndim))
        std_cond = eps_cond.std(dim=dims, keepdim=True)  # [B, 1, 1, 1]
        std_guided = guided.std(dim=dims, keepdim=True).clamp_min(torch.finfo(guided.dtype).tiny)  # 0 for a flat x_cfg
        rescaled = guided * (std_cond / std_guided)
        return self.phi * rescaled + (1 - self.phi) * guided

    def __repr__(self) -> str:
        return f"RescaledGuidance(scale={self.scale}, phi={self.phi})"
