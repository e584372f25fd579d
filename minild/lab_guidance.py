"""Guidance methods for the SDXL prompt lab on top of diffusers' classifier-free guidance:
``cfg`` (plain), ``cfg_rescale`` (diffusers' ``guidance_rescale``) and ``cfg_interval`` (CFG only
while σ_t lies in an interval), named like minild's guidance stages, with ``:key=value`` options.
"""

from __future__ import annotations

import contextlib

import torch

from minild import plugins
from minild.diffusers_adapter import parse_options

# method → the options the lab takes from it; their defaults and checks are those of minild's
# guidance stage of the same name (plugins/guidance/), which builds and validates them.
LAB_GUIDANCE_METHODS: dict[str, tuple[str, ...]] = {
    "cfg": (),
    "cfg_rescale": ("phi",),  # Lin et al. 2024, eq. 15–17; diffusers' guidance_rescale
    "cfg_interval": ("sigma_low", "sigma_high"),  # Kynkäänniemi et al. 2024
}


class LabGuidanceError(ValueError):
    """A guidance method name or option the lab cannot use."""


def parse_guidance_method(name: str) -> tuple[str, dict[str, float]]:
    """``"cfg_rescale:phi=0.5"`` → ``("cfg_rescale", {"phi": 0.5})``, defaults filled in and checked."""
    method, _, options = name.partition(":")
    if method not in LAB_GUIDANCE_METHODS:
        raise LabGuidanceError(f"unknown guidance method {method!r}; choose one of: {', '.join(LAB_GUIDANCE_METHODS)}")
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
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=eps)
        return (eps,)

    return forward
