"""Built-in samplers: DDPM ancestral sampling, DDIM and DPM-Solver++(2M), each exact against diffusers,
and the trailing-DDIM sampler of distilled students."""

from minild import hookimpl

from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .distilled import DistilledSampler
from .dpm_solver import DPMSolverPPSampler

__all__ = ["DDIMSampler", "DDPMSampler", "DistilledSampler", "DPMSolverPPSampler"]


@hookimpl
def register_samplers(register):
    register("ddpm", DDPMSampler)
    register("ddim", DDIMSampler)
    register("dpm_solver_pp", DPMSolverPPSampler)
    register("distilled", DistilledSampler)
