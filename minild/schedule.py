"""The noise schedule as data: tensors computed once from the betas, plus pure functions.

Index every tensor with the training timestep t = 0 … T−1 (the paper's t = 1 … T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Forward-process quantities of a variance schedule β_1 … β_T (all ``[T]`` float32)."""

    betas: torch.Tensor  # β_t
    alphas: torch.Tensor  # α_t = 1 − β_t
    alphas_cumprod: torch.Tensor  # ᾱ_t = ∏_{s≤t} α_s
    alphas_cumprod_prev: torch.Tensor  # ᾱ_{t−1}, with ᾱ_{−1} = 1
    posterior_variance: torch.Tensor  # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)   (DDPM eq. 7)
    # ᾱ copied to each device it was used on, once: a copy per training step would make the host
    # wait for the GPU every step (a blocking host-to-device copy).
    _alphas_cumprod_on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float32).detach().cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # Samplers divide by √ᾱ_t and by 1 − ᾱ_t: ᾱ must stay in (0, 1) and strictly decrease.
        if not bool(alphas_cumprod[-1] > 0):
            first = int((alphas_cumprod <= 0).nonzero()[0])
            raise ValueError(
                f"ᾱ_t underflows to 0 at t = {first} of {len(betas)}: the betas are too large for that many "
                "steps; lower beta_end (or the number of timesteps)"
            )
        if not bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all()) or not bool(alphas_cumprod[0] < 1):
            raise ValueError("some betas are too small to change ᾱ_t in float32 (below ~1e-7): raise them")
        alphas_cumprod_prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        return cls(betas, alphas, alphas_cumprod, alphas_cumprod_prev, posterior_variance)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def alphas_cumprod_on(self, device: torch.device | str) -> torch.Tensor:
        """ᾱ ``[T]`` on ``device`` (copied there once, then reused)."""
        device = torch.device(device)
        if device not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device)
        return self._alphas_cumprod_on[device]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε   (DDPM eq. 4).

        ``x0`` and ``noise``: ``[B, ...]``; ``t``: ``[B]`` int64 timesteps.
        """
        alphas_cumprod = self.alphas_cumprod_on(x0.device)[t].to(x0.dtype)
        alphas_cumprod = alphas_cumprod.reshape(-1, *([1] * (x0.ndim - 1)))
        return alphas_cumprod.sqrt() * x0 + (1.0 - alphas_cumprod).sqrt() * noise
