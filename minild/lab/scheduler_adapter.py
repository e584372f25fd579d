"""minild samplers driving diffusers pipelines: a sampler presented as a diffusers scheduler,
and the scheduler names the prompt lab accepts (``ddim``, ``euler``, ``dpm++2m``, ``minild:ddim``, …).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from minild import plugins
from minild.config import plain_value

MINILD_PREFIX = "minild:"

# Scheduler names → (diffusers class, config overrides). Each is built with ``from_config`` from the
# pipeline's own scheduler config, so betas, spacing and offsets stay the model's.
DIFFUSERS_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}

# diffusers beta_schedule → minild schedule plugin that computes the same betas.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear"}


class MinildScheduler(SchedulerMixin, ConfigMixin):
    """A minild sampler behind diffusers' scheduler interface (``set_timesteps``, ``step``,
    ``scale_model_input``, ``init_noise_sigma``, ``add_noise``).

    The config fields are diffusers' names, so ``MinildScheduler.from_config(pipe.scheduler.config,
    sampler="ddim")`` reads the betas, spacing and offsets of any pipeline. The sampler is the
    minild plugin ``sampler`` built with ``sampler_params``; it must offer the step-wise interface
    ``timesteps(num_inference_steps)`` and ``step(eps, t, x, *, t_prev, generator)``, and may offer
    ``state_scale(t)`` when its state is not x_t itself (σ-space samplers such as Euler).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        sampler: str = "ddim",
        sampler_params: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list | None = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        variance_type: str | None = None,
        thresholding: bool = False,
        rescale_betas_zero_snr: bool = False,
    ):
        _check_supported(
            trained_betas=trained_betas, prediction_type=prediction_type, variance_type=variance_type,
            thresholding=thresholding, rescale_betas_zero_snr=rescale_betas_zero_snr, beta_schedule=beta_schedule,
        )
        self.schedule = plugins.create(
            "schedule", BETA_SCHEDULES[beta_schedule],
            num_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
        )
        factory = plugins.lookup("sampler", sampler).factory
        if inspect.isclass(factory):
            _check_step_interface(sampler, factory)
        params = dict(sampler_params or {})
        check_sampler_options(sampler, params)
        accepted = sampler_options(sampler)
        # diffusers' config fields in minild's words: (option, value, required). A sampler gets each option
        # it has; a sampler without it runs only configs where the field keeps its neutral value
        # ("required" fields change the chain for every diffusers scheduler). set_alpha_to_one and
        # clip_sample are read only by samplers that have them, as only some diffusers schedulers do.
        translated = {
            "steps_offset": (steps_offset, steps_offset != 0),
            "timestep_spacing": (timestep_spacing, timestep_spacing != "leading"),
            "final_alpha_cumprod": ("one" if set_alpha_to_one else "first", False),
            "clip_sample": ("clip" if clip_sample else "none", False),
            "clip_sample_range": (clip_sample_range, False),
            "variance_type": (variance_type, variance_type not in (None, "fixed_small")),
        }
        for name, (value, required) in translated.items():
            if name in params or (name == "variance_type" and value is None):
                continue
            if name in accepted:
                params[name] = value
            elif required:
                raise ValueError(
                    f"minild sampler {sampler!r} has no {name!r} option, but the pipeline's scheduler config "
                    f"needs {name}={value!r}; use a sampler that has it (e.g. 'minild:ddim') or a diffusers scheduler"
                )
        self.sampler = plugins.create("sampler", sampler, self.schedule, **params)
        _check_step_interface(sampler, self.sampler)
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor([], dtype=torch.int64)
        self._timesteps: list[int] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._state_scales: torch.Tensor | None = None  # [T], for add_noise with a σ-space sampler

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the chain for ``num_inference_steps``; ``self.timesteps`` is it as an int64 tensor."""
        self._timesteps = list(self.sampler.timesteps(num_inference_steps))
        self.timesteps = torch.tensor(self._timesteps, dtype=torch.int64, device=device)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``self.timesteps[begin_index]`` (pipelines call this before their loop)."""
        self._begin_index = begin_index

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """The scale of the initial noise: the sampler's ``state_scale`` at the chain's first timestep
        (1: x_T ~ N(0, I) for samplers whose state is x_t)."""
        if not hasattr(self.sampler, "state_scale"):
            return 1.0
        first = self._timesteps[0] if self._timesteps else self.config.num_train_timesteps - 1
        return self.sampler.state_scale(first)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """The eps-model's input x_t: ``sample`` itself, or ``sample / state_scale(t)`` for a sampler
        that keeps another state."""
        if not hasattr(self.sampler, "state_scale"):
            return sample
        return sample / self.sampler.state_scale(self._timesteps[self._current_index(timestep)])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor]:
        """One sampler step from ``sample`` (x_t) with the model's ε ``model_output``.

        The position in the chain is counted from ``set_begin_index`` (or looked up from
        ``timestep`` on the first call without it), so no step reads a device tensor back.
        """
        index = self._current_index(timestep)
        if index >= len(self._timesteps):
            raise ValueError(f"step() called more than the {len(self._timesteps)} steps set by set_timesteps")
        t = self._timesteps[index]
        t_prev = self._timesteps[index + 1] if index + 1 < len(self._timesteps) else None
        prev_sample, x0_pred = self.sampler.step(model_output, t, sample, t_prev=t_prev, generator=generator)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0_pred)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) of the schedule (img2img and refiner pipelines start here), in the sampler's
        state scale."""
        timesteps = timesteps.to(original_samples.device)
        noisy = self.schedule.add_noise(original_samples, noise, timesteps)
        if not hasattr(self.sampler, "state_scale"):
            return noisy
        if self._state_scales is None:
            self._state_scales = torch.stack(
                [torch.as_tensor(self.sampler.state_scale(t), dtype=torch.float32) for t in range(len(self))]
            )
        scales = self._state_scales.to(device=noisy.device, dtype=noisy.dtype)[timesteps]
        return noisy * scales.reshape(-1, *[1] * (noisy.dim() - 1))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _current_index(self, timestep: int | torch.Tensor | None) -> int:
        """The position in the chain: counted from ``set_begin_index``, else looked up once from
        ``timestep`` (diffusers' ``_init_step_index``)."""
        if not self._timesteps:
            raise ValueError("call set_timesteps(num_inference_steps) before step() or scale_model_input()")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._index_of(timestep)
        return self._step_index

    def _index_of(self, timestep: int | torch.Tensor) -> int:
        t = int(timestep)
        if t not in self._timesteps:
            raise ValueError(f"timestep {t} is not in this scheduler's chain {self._timesteps}")
        return self._timesteps.index(t)


def _check_step_interface(sampler: str, obj: Any) -> None:
    for method in ("timesteps", "step"):
        if not callable(getattr(obj, method, None)):
            raise ValueError(
                f"minild sampler {sampler!r} has no {method}() method; driving a diffusers pipeline needs "
                "the step-wise interface timesteps(num_inference_steps) and step(eps, t, x, *, t_prev, generator)"
            )


def sampler_options(sampler: str) -> list[str] | None:
    """The keyword options of the minild sampler ``sampler`` (None when its factory takes ``**params``)."""
    parameters = list(inspect.signature(plugins.lookup("sampler", sampler).factory).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_sampler_options(sampler: str, params: dict[str, Any]) -> None:
    """A ValueError naming the accepted options when ``params`` has a key the sampler does not take."""
    accepted = sampler_options(sampler)
    unknown = sorted(set(params) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"minild sampler {sampler!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(accepted) or '(none)'}"
        )


def parse_scheduler_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"minild:ddim:eta=1,clip_sample=clip"`` → ``("ddim", {"eta": 1, "clip_sample": "clip"})``.

    Values are read as int, float, bool (true/false), None (null) or else kept as strings.
    """
    sampler, _, options = name[len(MINILD_PREFIX):].partition(":")
    return sampler, parse_options(options, name)


def parse_options(options: str, name: str) -> dict[str, Any]:
    """``"eta=1,clip_sample=clip"`` (the part of ``name`` after its colon) → a dict of plain values."""
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"option {item!r} in {name!r} must be key=value, e.g. minild:ddim:eta=1")
        params[key.strip()] = plain_value(value.strip())
    return params


def _check_supported(*, trained_betas, prediction_type, variance_type, thresholding, rescale_betas_zero_snr,
                     beta_schedule) -> None:
    problems = []
    if beta_schedule not in BETA_SCHEDULES:
        problems.append(f"beta_schedule={beta_schedule!r} (supported: {', '.join(BETA_SCHEDULES)})")
    if trained_betas is not None:
        problems.append("trained_betas")
    if prediction_type != "epsilon":
        problems.append(f"prediction_type={prediction_type!r} (minild samplers take epsilon predictions)")
    if variance_type not in (None, "fixed_small", "fixed_large"):
        problems.append(f"variance_type={variance_type!r} (minild samplers take no predicted variance)")
    if thresholding:
        problems.append("thresholding=True")
    if rescale_betas_zero_snr:
        problems.append("rescale_betas_zero_snr=True")
    if problems:
        raise ValueError(
            "this pipeline's scheduler config has settings minild samplers do not implement: "
            + "; ".join(problems)
            + ". Use a diffusers scheduler (e.g. --scheduler ddim) for this model."
        )


def scheduler_names() -> list[str]:
    """Every name ``make_scheduler`` accepts: diffusers' schedulers, then ``minild:<sampler>``."""
    return sorted(DIFFUSERS_SCHEDULERS) + [MINILD_PREFIX + name for name in plugins.available("sampler")]


def check_scheduler_name(name: str) -> None:
    """Fail early (before a model loads) on an unknown scheduler name or an unknown sampler option."""
    if name == "default" or name in DIFFUSERS_SCHEDULERS:
        return
    if not name.startswith(MINILD_PREFIX):
        raise ValueError(f"unknown scheduler {name!r}; choose default or one of: {', '.join(scheduler_names())}")
    sampler, params = parse_scheduler_name(name)
    plugins.lookup("sampler", sampler)
    check_sampler_options(sampler, params)


def make_scheduler(name: str, config: Any, **sampler_params: Any) -> SchedulerMixin:
    """The scheduler ``name`` built from a pipeline's scheduler ``config``.

    ``"ddim"``, ``"euler"``, ``"dpm++2m"``, … are diffusers classes (``from_config``);
    ``"minild:<sampler>"`` is a minild sampler plugin behind ``MinildScheduler``, built with the
    options written after it (``"minild:ddim:eta=1"``) and ``sampler_params``.
    """
    if name.startswith(MINILD_PREFIX):
        sampler, params = parse_scheduler_name(name)
        params.update(sampler_params)
        plugins.lookup("sampler", sampler)  # an unknown name fails here, listing the installed samplers
        known = inspect.signature(MinildScheduler.__init__).parameters
        config = {key: value for key, value in dict(config).items() if key in known}  # drop other schedulers' fields
        return MinildScheduler.from_config(config, sampler=sampler, sampler_params=params or None)
    if sampler_params:
        raise ValueError(f"sampler parameters {sorted(sampler_params)} apply only to minild:<sampler> schedulers")
    if name not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")
    cls, overrides = DIFFUSERS_SCHEDULERS[name]
    return cls.from_config(config, **overrides)
