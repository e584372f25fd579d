"""Small helpers the samplers share: timestep spacing, noise draws, argument checks.

Noise is drawn like diffusers' ``randn_tensor``, so a seed gives the same images in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GeneratorOrList = torch.Generator | Sequence[torch.Generator] | None


def check_num_inference_steps(num_inference_steps, num_timesteps: int) -> None:
    """An integer in [1, num_timesteps], or a ValueError that says so."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_timesteps:
        raise ValueError(
            f"num_inference_steps must lie in [1, {num_timesteps}] (the schedule's num_timesteps), "
            f"got {num_inference_steps}"
        )


def check_default_steps(num_inference_steps, num_timesteps: int) -> None:
    """A sampler's configured default chain length: None, or as ``check_num_inference_steps``."""
    if num_inference_steps is not None:
        check_num_inference_steps(num_inference_steps, num_timesteps)


def leading_timesteps(num_timesteps: int, num_inference_steps: int, steps_offset: int = 0) -> list[int]:
    """diffusers' "leading" spacing: T//n·(n−1), …, T//n, 0, each plus ``steps_offset``.

    1000 steps of 1000 give 999, 998, …, 0; 50 give 980, 960, …, 0 (981, …, 1 with the offset 1
    that Stable Diffusion and SDXL use).
    """
    check_num_inference_steps(num_inference_steps, num_timesteps)
    step_ratio = num_timesteps // num_inference_steps
    timesteps = [i * step_ratio + steps_offset for i in reversed(range(num_inference_steps))]
    if timesteps[0] >= num_timesteps:
        raise ValueError(
            f"{num_inference_steps} steps with steps_offset={steps_offset} start at t={timesteps[0]}, past the "
            f"schedule's last timestep {num_timesteps - 1}; use fewer steps or steps_offset=0"
        )
    return timesteps


def randn(
    shape: Sequence[int], generator: GeneratorOrList, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    With a list of B generators, sample b's noise comes from ``generator[b]`` alone, so each
    image is reproducible whatever batch it is drawn in. Noise is drawn on the generator's
    device (CPU by default) and then moved, as diffusers does. The move does not wait for the
    device's queued work: a blocking copy would make the host wait for the GPU at every
    stochastic step.
    """
    if isinstance(generator, Sequence):
        batch = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(batch).to(device, non_blocking=True)
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype).to(device, non_blocking=True)


def initial_latents(
    shape: Sequence[int],
    generator: GeneratorOrList,
    latents: torch.Tensor | None,
    device: str | torch.device | None,
) -> torch.Tensor:
    """x_T: ``latents`` as given, else standard normal noise drawn with ``generator``.

    The loop runs on ``latents.device`` and in ``latents.dtype`` when latents are given, else in
    float32 on ``device`` (default CPU).
    """
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"shape must be (B, C, H, W) or another (B, ...) of positive integers, got {shape}")
    if isinstance(generator, Sequence) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but shape is {shape}")
        return latents
    return randn(shape, generator, torch.device(device or "cpu"), torch.float32)


def chain_from(timesteps: list[int], start_step) -> list[int]:
    """``timesteps[start_step:]``: the chain an edit (SDEdit, inpainting) walks from the image it
    noised to ``timesteps[start_step]``; ``start_step`` an integer in [0, len(timesteps))."""
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < len(timesteps):
        raise ValueError(
            f"start_step must be an integer in [0, {len(timesteps)}) for a chain of {len(timesteps)} steps, "
            f"got {start_step!r}"
        )
    return timesteps[start_step:]


def run_chain(sampler, model_fn, x: torch.Tensor, timesteps: list[int], generator: GeneratorOrList, callback):
    """The loop every step-wise sampler shares: ε from ``model_fn`` at each timestep, then
    ``sampler.step`` to the next one (``t_prev=None`` after the last), ``callback`` after each."""
    t_batches = torch.tensor(timesteps, device=x.device)[:, None].expand(-1, x.shape[0])  # [n, B]
    takes_timestep = getattr(model_fn, "takes_timestep", False)  # then t as an int spares it a read-back
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        eps = model_fn(x, t_batches[i], timestep=t) if takes_timestep else model_fn(x, t_batches[i])
        x, x0_pred = sampler.step(eps, t, x, t_prev=t_prev, generator=generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0_pred": x0_pred})
    return x


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_steps_offset(steps_offset: int) -> None:
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")


def check_clip_sample_range(clip_sample_range: float) -> None:
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
