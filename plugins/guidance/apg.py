"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of
high guidance scales in diffusion models", Algorithm 1)."""

from __future__ import annotations

import torch

from minild.pipeline.guidance import Guidance, check_number


class AdaptiveProjectedGuidance(Guidance):
    """CFG's update Δ = D_c − D_u on the denoised prediction D = x̂0, with three changes:

        Δ_t ← Δ_t + β · Δ̄_{t+1}                     momentum (β < 0 pushes off the previous steps)
        Δ   ← Δ · min(1, r / ‖Δ‖)                    rescale: the norm at most r, per sample
        Δ   = Δ∥ + Δ⊥,  Δ∥ = (⟨Δ, D_c⟩ / ‖D_c‖²) D_c   project onto the conditional prediction
        D̃  = D_c + (s − 1) · (Δ⊥ + η Δ∥)                                  (paper, eq. 6–12)

    η = 0 drops the parallel part, which is what over-saturates images at high scales.
    Like the paper, this works on x̂0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t (so r is a norm of images, not of
    noise), then returns ε̃ = (x_t − √ᾱ_t D̃)/√(1 − ᾱ_t) = ε_c − (s − 1)(Δ⊥ + η Δ∥)/σ_t with
    σ_t = √((1 − ᾱ_t)/ᾱ_t). Norms and projections are per sample over C, H, W.

    - ``momentum`` β: the paper's default −0.5; 0 switches momentum off.
    - ``norm_threshold`` r: 2.5 (the reference code's value for latent images); the right r grows
      with the image size (√(C·H·W)); 0 switches the rescaling off.
    - ``eta`` η: weight of the parallel component; 0 as in the paper, 1 keeps CFG's direction.
    The momentum average is per sampling run: ``bind`` / ``reset`` clears it.
    """

    def __init__(self, *, scale: float = 3.0, momentum: float = -0.5, norm_threshold: float = 2.5, eta: float = 0.0):
        super().__init__(scale=scale)
        self.momentum = check_number(momentum, "apg momentum")
        self.norm_threshold = check_number(norm_threshold, "apg norm_threshold")
        self.eta = check_number(eta, "apg eta")
        if self.norm_threshold < 0:
            raise ValueError(f"apg norm_threshold must be >= 0 (0 = no rescaling), got {norm_threshold}")
        if not -1.0 < self.momentum < 1.0:
            raise ValueError(f"apg momentum must lie in (-1, 1) (the paper uses -0.5), got {momentum}")
        self.reset()

    def reset(self) -> None:
        self.running_average: torch.Tensor | None = None  # Δ̄ of the steps so far, [B, C, H, W]

    def __call__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, *, t: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        if self.sigmas is None:
            raise ValueError("apg needs the noise schedule: bind it with guidance.bind(schedule)")
        sigma = self.schedule_values(self.sigmas, t, eps_cond)  # σ_t, [B, 1, 1, 1]
        dims = list(range(1, eps_cond.ndim))
        # x̂0 = (x − √(1−ᾱ) ε)/√ᾱ = x/√ᾱ − σ ε, so D_c − D_u = −σ (ε_c − ε_u).
        denoised_cond = x * (1 + sigma**2).sqrt() - sigma * eps_cond  # D_c; 1/√ᾱ = √(1 + σ²)
        diff = -sigma * (eps_cond - eps_uncond)  # Δ = D_c − D_u
        if self.momentum != 0.0:
            if self.running_average is not None:
                diff = diff + self.momentum * self.running_average
            self.running_average = diff
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)  # [B, 1, 1, 1]
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        unit = torch.nn.functional.normalize(denoised_cond.flatten(1), dim=1).view_as(denoised_cond)
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
        update = (diff - parallel) + self.eta * parallel
        return eps_cond - (self.scale - 1) * update / sigma

    def __repr__(self) -> str:
        return (f"AdaptiveProjectedGuidance(scale={self.scale}, momentum={self.momentum}, "
                f"norm_threshold={self.norm_threshold}, eta={self.eta})")
