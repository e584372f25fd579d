"""Built-in noise schedules: DDPM's linear betas, Stable Diffusion's scaled-linear betas and
Improved-DDPM's cosine ᾱ.

Each factory returns a ``minild.NoiseSchedule`` (float32 tensors indexed by t = 0 … T−1).
"""

from __future__ import annotations

import math

import torch

from minild import NoiseSchedule, hookimpl

COSINE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """β_t evenly spaced from ``beta_start`` to ``beta_end`` (DDPM, Ho et al. 2020).

    Computed in float32 exactly as diffusers' ``beta_schedule="linear"``.
    """
    _check_num_timesteps(num_timesteps)
    _check_beta_range("linear", beta_start, beta_end)
    return NoiseSchedule.from_betas(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32))


def scaled_linear(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> NoiseSchedule:
    """√β_t evenly spaced from √``beta_start`` to √``beta_end``, then squared (Stable Diffusion, SDXL).

    Computed in float32 exactly as diffusers' ``beta_schedule="scaled_linear"``; the defaults are
    Stable Diffusion's and SDXL's.
    """
    _check_num_timesteps(num_timesteps)
    _check_beta_range("scaled_linear", beta_start, beta_end)
    return NoiseSchedule.from_betas(
        torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
    )


def cosine(
    num_timesteps: int = 1000,
    s: float = 0.008,
    min_beta: float = 1e-4,
    max_beta: float = 0.9999,
    dtype: str = "float32",
) -> NoiseSchedule:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) / ᾱ(0),  β_t = clip(1 − ᾱ(t+1)/ᾱ(t), min_beta, max_beta).

    The defaults are the seeds' (float32, clipped to [1e-4, 0.9999]). With ``min_beta=0``,
    ``max_beta=0.999`` and ``dtype="float64"`` (the computation dtype; the result is float32)
    the betas equal diffusers' ``beta_schedule="squaredcos_cap_v2"``.
    """
    _check_num_timesteps(num_timesteps)
    if s < 0:
        raise ValueError(f"cosine schedule needs the offset s >= 0, got s={s}")
    if not 0 <= min_beta <= max_beta < 1:
        raise ValueError(
            f"cosine schedule needs 0 <= min_beta <= max_beta < 1, got min_beta={min_beta}, max_beta={max_beta}"
        )
    if dtype not in COSINE_DTYPES:
        raise ValueError(f"cosine schedule dtype must be one of {sorted(COSINE_DTYPES)}, got {dtype!r}")
    steps = torch.linspace(0, num_timesteps, num_timesteps + 1, dtype=COSINE_DTYPES[dtype])  # t = 0 … T
    alphas_cumprod = torch.cos((steps / num_timesteps + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return NoiseSchedule.from_betas(betas.clip(min_beta, max_beta).to(torch.float32))


def _check_num_timesteps(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")


def _check_beta_range(schedule: str, beta_start: float, beta_end: float) -> None:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(
            f"{schedule} schedule needs 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
            f"beta_end={beta_end}"
        )


@hookimpl
def register_schedules(register):
    register("linear", linear)
    register("scaled_linear", scaled_linear)
    register("cosine", cosine)
