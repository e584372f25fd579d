"""Built-in samplers: DDPM ancestral sampling and DDIM, each exact against diffusers."""

from minild import hookimpl

from .ddim import DDIMSampler
from .ddpm import DDPMSampler

__all__ = ["DDIMSampler", "DDPMSampler"]


@hookimpl
def register_samplers(register):
    register("ddpm", DDPMSampler)
    register("ddim", DDIMSampler)
