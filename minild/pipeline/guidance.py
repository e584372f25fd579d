"""Guidance: how the conditional and unconditional eps of one step become the eps a sampler
uses. The base class the built-in guidance plugins share, and the guided ``model_fn`` (any
guidance stage, or plain classifier-free guidance at a scale)."""

from __future__ import annotations

import copy
import math
from numbers import Real
from typing import Any, Callable

import torch

from minild import plugins
from minild.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_number(value: Any, where: str, hint: str = "") -> float:
    """A finite real number (not a bool, not a string), as a float; else a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number{hint}, got {value!r}")
    return float(value)


def check_scale(scale: Any, where: str = "guidance scale") -> float:
    return check_number(scale, where, " (1.0 = plain conditional)")


def noise_levels(schedule: NoiseSchedule) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0 … T−1 (``[T]`` float32, CPU): the noise level of x_t in
    the σ-space of EDM (Karras et al. 2022), where x_t/√ᾱ_t = x_0 + σ_t ε."""
    alphas_cumprod = schedule.alphas_cumprod
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


class Guidance:
    """A base for guidance plugins: ``scale``, ``bind``, per-run state, the schedule's σ_t.

    Subclasses implement ``__call__(eps_cond, eps_uncond, *, t, x)`` and, if they keep state
    across steps, ``reset()``; see ``minild.hookspecs.register_guidances`` for the contract.
    """

    uncond_depends_on_t = False  # True: needs_uncond / needs_cond look at t (asked every step)

    def __init__(self, *, scale: float = 3.0):
        self.scale = check_scale(scale, "guidance scale")
        self.schedule: NoiseSchedule | None = None
        self.sigmas: torch.Tensor | None = None
        self._on_device: dict = {}

    def bind(self, schedule: NoiseSchedule | None) -> "Guidance":
        """A fresh guider for one sampling run on ``schedule``: a copy, its state reset."""
        guider = copy.copy(self)
        guider.schedule = schedule
        guider.sigmas = noise_levels(schedule) if schedule is not None else None
        guider._on_device = {}
        guider.reset()
        return guider

    def reset(self) -> None:
        """Forget the state of a previous sampling run (none here)."""

    def needs_uncond(self, t: int) -> bool:
        return self.scale != 1.0

    def needs_cond(self, t: int) -> bool:
        return True

    def schedule_values(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` (a ``[T]`` CPU table) for the ``[B]`` timesteps ``t``, shaped ``[B, 1, 1, 1]``
        in the dtype and on the device of ``like``; the table moves to that device once per run."""
        key = (like.device, like.dtype, id(values))
        if key not in self._on_device:
            self._on_device[key] = values.to(device=like.device, dtype=like.dtype)
        return self._on_device[key][t.to(like.device)].reshape(-1, *[1] * (like.ndim - 1))

    def __call__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, *, t: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


def guided_model_fn(model, cond: dict[str, Any], uncond: dict[str, Any], guider) -> ModelFn:
    """``model_fn(x, t) -> eps`` with conditioning and ``guider`` (bound) folded in.

    Per step: only the conditional pass when ``guider.needs_uncond(t)`` is False, only the
    unconditional pass when ``guider.needs_cond(t)`` is False (its eps used as is), else both
    halves in one batched forward combined by ``guider(eps_cond, eps_uncond, t=t, x=x)``.
    With no conditioning (``cond`` empty) the model runs alone. A guider whose answers do not
    depend on t (``uncond_depends_on_t`` False) is asked once per run, at t = 0; otherwise at
    every step, at ``timestep`` (the step's timestep as a Python int, which minild's samplers
    pass, see ``takes_timestep``) or else at ``t[0]`` read back from the device (a host sync;
    the samplers give every sample the same t).
    """
    if not cond:
        return lambda x, t: model(x, t)
    both: dict[str, torch.Tensor] = {}  # cond and uncond batched, built at the first two-pass step
    fixed: list[tuple[bool, bool]] = []  # the once-per-run answer of a t-independent guider

    def passes(t: torch.Tensor, timestep: int | None) -> tuple[bool, bool]:
        if fixed:
            return fixed[0]
        depends_on_t = getattr(guider, "uncond_depends_on_t", True)
        if not depends_on_t:
            step = 0  # the same answer at every t
        else:
            step = timestep if timestep is not None else int(t[0])  # int(t[0]): a host sync
        needs_cond = getattr(guider, "needs_cond", None)  # optional in the contract
        answer = (needs_cond is None or bool(needs_cond(step)), bool(guider.needs_uncond(step)))
        if not depends_on_t:
            fixed.append(answer)
        return answer

    def guided(x: torch.Tensor, t: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        use_cond, use_uncond = passes(t, timestep)
        if not use_uncond:
            return model(x, t, **cond)
        if not use_cond:
            return model(x, t, **uncond)
        # One batched forward for the conditional and unconditional halves.
        if not both:
            both.update({key: torch.cat([cond[key], uncond[key]]) for key in cond})
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return guider(eps_cond, eps_uncond, t=t, x=x)

    guided.takes_timestep = True
    return guided


def cfg_model_fn(model, cond: dict[str, Any], uncond: dict[str, Any], guidance_scale: float) -> ModelFn:
    """``guided_model_fn`` with the registered ``cfg`` guidance at ``guidance_scale``:
    eps = eps_u + s · (eps_c − eps_u). s = 1 is the conditional model alone and s = 0 the
    unconditional one (one pass each); the CFG paper's w is s − 1."""
    return guided_model_fn(model, cond, uncond, plugins.create("guidance", "cfg", scale=guidance_scale).bind(None))
