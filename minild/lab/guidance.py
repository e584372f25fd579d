"""Guidance methods for the SDXL prompt lab on top of diffusers' classifier-free guidance:
``cfg`` (plain), ``cfg_rescale`` (diffusers' ``guidance_rescale``) and ``cfg_interval`` (CFG only
while σ_t lies in an interval), named like minild's guidance stages, with ``:key=value`` options;
and ``minild:<stage>[:key=value,…]``, any registered guidance stage (``apg``, a plugin's) run
through a wrapper of the UNet.
"""

from __future__ import annotations

import contextlib

import torch

from minild import plugins
from minild.config import parse_stage
from minild.lab.scheduler_adapter import MINILD_PREFIX, parse_options  # minild:<name>[:key=value,…], as for samplers
from minild.schedule import NoiseSchedule

# method → the options the lab takes from it; their defaults and checks are those of minild's
# guidance stage of the same name (plugins/guidance/), which builds and validates them.
LAB_GUIDANCE_METHODS: dict[str, tuple[str, ...]] = {
    "cfg": (),
    "cfg_rescale": ("phi",),  # Lin et al. 2024, eq. 15–17; diffusers' guidance_rescale
    "cfg_interval": ("sigma_low", "sigma_high"),  # Kynkäänniemi et al. 2024
}


class LabGuidanceError(ValueError):
    """A guidance method name or option the lab cannot use."""


def parse_guidance_method(name: str) -> tuple[str, dict]:
    """``"cfg_rescale:phi=0.5"`` → ``("cfg_rescale", {"phi": 0.5})``, defaults filled in and checked;
    ``"minild:apg:eta=0.5"`` → ``("minild:apg", {"eta": 0.5})``, the options as given (checked by
    building the stage)."""
    if name.startswith(MINILD_PREFIX):
        return _parse_stage_method(name)
    method, _, options = name.partition(":")
    if method not in LAB_GUIDANCE_METHODS:
        raise LabGuidanceError(
            f"unknown guidance method {method!r}; choose one of: {', '.join(LAB_GUIDANCE_METHODS)}, or any "
            f"guidance stage as {MINILD_PREFIX}<name> ({', '.join(plugins.available('guidance'))})"
        )
    known = LAB_GUIDANCE_METHODS[method]
    given = parse_options(options, name)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise LabGuidanceError(
            f"guidance method {method!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(known) or '(none)'}"
        )
    try:
        stage = plugins.create("guidance", method, **given)
    except ValueError as err:
        raise LabGuidanceError(str(err)) from None
    return method, {key: float(getattr(stage, key)) for key in known}


def _parse_stage_method(name: str) -> tuple[str, dict]:
    stage, _, options = name[len(MINILD_PREFIX):].partition(":")
    available = plugins.available("guidance")
    if stage not in available:
        raise LabGuidanceError(f"unknown guidance stage {stage!r} in {name!r}; available: {', '.join(available)}")
    given = parse_options(options, name)
    if "scale" in given:
        raise LabGuidanceError(f"{name!r}: the lab sets the guidance scale from its guidance scales; drop scale=")
    try:  # the option names and types, then the stage's own checks of the values
        parse_stage("guidance", {"name": stage, **given}, f"guidance method {name!r}", "guidance")
        plugins.create("guidance", stage, **given)
    except ValueError as err:
        raise LabGuidanceError(str(err) if str(err).startswith("guidance method") else f"{name!r}: {err}") from None
    return MINILD_PREFIX + stage, given


@contextlib.contextmanager
def applied(pipes, name: str):
    """Apply the guidance method ``name`` to the diffusers pipelines ``pipes`` for one run; yields
    the extra keyword arguments for their calls."""
    method, params = parse_guidance_method(name)
    if method == "cfg_rescale":
        yield {"guidance_rescale": params["phi"]}
        return
    if method == "cfg":
        yield {}
        return
    for pipe in pipes:
        if method.startswith(MINILD_PREFIX):
            pipe.unet.forward = _stage_forward(pipe, method[len(MINILD_PREFIX):], params)
        else:
            pipe.unet.forward = _interval_forward(pipe, params["sigma_low"], params["sigma_high"])
    try:
        yield {}
    finally:
        for pipe in pipes:
            del pipe.unet.forward  # back to the class's forward


def _interval_forward(pipe, sigma_low: float, sigma_high: float):
    """The UNet's forward, but outside σ_low < σ_t ≤ σ_high a guided batch [uncond; cond] runs the
    conditional half alone and returns its eps twice, so the pipeline's CFG mix ε_u + s (ε_c − ε_u)
    is ε_c there (and the unconditional forward is saved). σ_t = √((1 − ᾱ_t)/ᾱ_t) of the pipeline's
    scheduler; reading t is one host sync per step."""
    unet = pipe.unet
    original = type(unet).forward.__get__(unet)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().tolist()

    def forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kwargs):
        t = min(max(int(round(float(timestep))), 0), len(sigmas) - 1)
        guided = pipe.do_classifier_free_guidance and sample.shape[0] % 2 == 0
        if not guided or sigma_low < sigmas[t] <= sigma_high:
            return original(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                            return_dict=return_dict, **kwargs)
        half = sample.shape[0] // 2  # diffusers stacks [unconditional; conditional]
        cond_kwargs = None if added_cond_kwargs is None else {k: v[half:] for k, v in added_cond_kwargs.items()}
        output = original(sample[half:], timestep, encoder_hidden_states[half:], *args,
                          added_cond_kwargs=cond_kwargs, return_dict=False, **kwargs)
        eps = torch.cat([output[0], output[0]])
        return _unet_output(eps, return_dict)

    return forward


def _stage_forward(pipe, stage: str, params: dict):
    """The UNet's forward, with a guided batch [uncond; cond] (diffusers' order) mixed by minild's
    guidance stage ``stage``: both halves run in one forward as usual, the stage's guider turns them
    into ε̃, and ε̃ is returned for both halves, so the pipeline's own mix ε_u + s (ε_c − ε_u) is ε̃.
    The guider is bound afresh (its per-run state cleared, the pipeline's current guidance scale
    taken) whenever the timestep goes up, i.e. at the start of every pipeline call. x_t is the
    UNet's input (``scale_model_input`` makes it x_t for every scheduler); the guider works in
    float32. Reading the timestep is one host sync per step, negligible beside an SDXL UNet."""
    unet = pipe.unet
    original = type(unet).forward.__get__(unet)
    schedule = _schedule_of(pipe.scheduler)
    state = {"guider": None, "timestep": None}

    def forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kwargs):
        output = original(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                          return_dict=False, **kwargs)
        eps = output[0]
        if pipe.do_classifier_free_guidance and sample.shape[0] % 2 == 0:
            t = int(round(float(timestep)))
            if state["guider"] is None or t > state["timestep"]:  # a new pipeline call
                guidance = plugins.create("guidance", stage, scale=float(pipe.guidance_scale), **params)
                state["guider"] = guidance.bind(schedule)
            state["timestep"] = t
            eps_uncond, eps_cond = eps.float().chunk(2)
            half = sample.shape[0] // 2
            t_batch = torch.full((half,), min(max(t, 0), schedule.num_timesteps - 1), device=eps.device)
            x = sample[half:, :eps.shape[1]].float()  # an inpainting UNet's input is [x_t; mask; masked image]
            guided = state["guider"](eps_cond, eps_uncond, t=t_batch, x=x).to(eps.dtype)
            eps = torch.cat([guided, guided])
        return _unet_output(eps, return_dict)

    return forward


def _schedule_of(scheduler) -> NoiseSchedule:
    """minild's ``NoiseSchedule`` of a diffusers scheduler's ᾱ_t (β_t = 1 − ᾱ_t / ᾱ_{t−1})."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).cpu()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return NoiseSchedule.from_betas(1 - alphas_cumprod / previous)


def _unet_output(eps: torch.Tensor, return_dict: bool):
    """What the UNet's own forward returns for ``eps``: its output class, or a 1-tuple."""
    if not return_dict:
        return (eps,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=eps)
