"""The two losses of guided distillation, one batch at a time: matching the teacher's guided eps
(Meng et al. 2023, stage 1) and one student DDIM step matching two of its teacher's (Salimans & Ho
2022, progressive distillation). Pure functions of tensors, a schedule and a torch.Generator."""

from __future__ import annotations

import torch

from minild.schedule import NoiseSchedule


def trailing_timestep(num_timesteps: int, k, num_steps: int):
    """Step k of a trailing chain of ``num_steps``: ⌊T·k/n⌋ − 1 (−1 for k = 0, the clean image), for
    an int k or a [B] int64 tensor. The ``distilled`` sampler's chain; the chain of 2n holds that of n."""
    return num_timesteps * k // num_steps - 1


def signal_and_noise(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) for ``t`` [B] (t = −1: ᾱ = 1), each [B, 1, 1, 1] like ``like``."""
    alphas_cumprod = torch.cat([torch.ones(1), schedule.alphas_cumprod.float()]).to(like.device)  # [T + 1]
    alpha_bar = alphas_cumprod[t + 1].to(like.dtype).reshape(-1, *[1] * (like.ndim - 1))
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device (the CPU's stream
    whatever device trains: resumable and the same on every machine) and moved to ``like``'s."""
    return torch.randn(like.shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def guided_eps_loss(student, teacher, guider, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor,
                    scale: float, generator: torch.Generator) -> torch.Tensor:
    """Stage 1: ‖ε_student(x_t, t, c, w) − ε_guided(x_t, t, c; w)‖² at random t, one w for the batch.

    ``teacher`` is the trained class-conditional eps-model, ``guider`` its guidance stage bound at
    scale ``scale`` = w: ε_guided = guider(ε(x_t, c), ε(x_t, ∅), t=t, x=x_t) (for CFG ε_u + w(ε_c − ε_u)).
    ``x0`` [B, C, H, W] training images (or latents), ``labels`` [B] their classes.
    """
    batch = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator).to(x0.device)  # [B]
    noise = _randn(x0, generator)
    alpha, sigma = signal_and_noise(schedule, t, x0)
    x_t = alpha * x0 + sigma * noise  # the forward process q(x_t | x_0)
    with torch.no_grad():
        null = torch.full_like(labels, teacher.num_classes)
        eps_cond, eps_uncond = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                       class_labels=torch.cat([labels, null])).chunk(2)
        target = guider(eps_cond, eps_uncond, t=t, x=x_t)
    eps = student(x_t, t, class_labels=labels, guidance_scale=torch.full((batch,), scale, device=x0.device))
    return (eps - target).square().mean()


def ddim_step(model, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, schedule: NoiseSchedule,
              labels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12, η = 0) from x_t to x_{t_next}, per sample."""
    alpha, sigma = signal_and_noise(schedule, t, x)
    alpha_next, sigma_next = signal_and_noise(schedule, t_next, x)
    eps = model(x, t, class_labels=labels, guidance_scale=scales)
    x0 = (x - sigma * eps) / alpha  # x̂0
    return alpha_next * x0 + sigma_next * eps


def progressive_loss(student, teacher, schedule: NoiseSchedule, num_steps: int, x0: torch.Tensor,
                     labels: torch.Tensor, scale_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Stage 2: one student step of a ``num_steps`` chain matches two steps of its teacher's 2n chain.

    For a random step k (t = t_k, t'' = t_{k−1} on the n chain, t' the teacher's midpoint), the
    teacher's two DDIM steps give x_{t''}; the x̃ for which one DDIM step from x_t lands there is

        x̃ = (x_{t''} − (σ_{t''}/σ_t) x_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)      (Salimans & Ho, Alg. 2)

    and the loss is max(SNR_t, 1) ‖x̂0_student − x̃‖² ("truncated SNR" weighting). The teacher and
    the student are guidance-scale students; w is drawn per sample from ``scale_range``.
    """
    batch, T = x0.shape[0], schedule.num_timesteps
    k = torch.randint(1, num_steps + 1, (batch,), generator=generator).to(x0.device)  # [B]
    low, high = scale_range
    scales = (low + (high - low) * torch.rand(batch, generator=generator)).to(x0.device)  # [B]
    noise = _randn(x0, generator)
    t = trailing_timestep(T, k, num_steps)
    t_mid = trailing_timestep(T, 2 * k - 1, 2 * num_steps)
    t_prev = trailing_timestep(T, k - 1, num_steps)
    alpha, sigma = signal_and_noise(schedule, t, x0)
    alpha_prev, sigma_prev = signal_and_noise(schedule, t_prev, x0)
    x_t = alpha * x0 + sigma * noise
    with torch.no_grad():
        x_mid = ddim_step(teacher, x_t, t, t_mid, schedule, labels, scales)
        x_prev = ddim_step(teacher, x_mid, t_mid, t_prev, schedule, labels, scales)
        ratio = sigma_prev / sigma
        target = (x_prev - ratio * x_t) / (alpha_prev - ratio * alpha)  # x̃
    eps = student(x_t, t, class_labels=labels, guidance_scale=scales)
    x0_pred = (x_t - sigma * eps) / alpha
    weight = torch.clamp(alpha.square() / sigma.square(), min=1.0)  # max(SNR_t, 1)
    return (weight * (x0_pred - target).square()).mean()
