"""Every built-in schedule, eps-model and sampler passes minild's plugin conformance suite."""

from __future__ import annotations

from minild import plugins
from minild.testing import GuidanceConformance, ModelConformance, SamplerConformance, ScheduleConformance
from tests.conftest import TINY_MODELS


class TestLinearSchedule(ScheduleConformance):
    name = "linear"


class TestCosineSchedule(ScheduleConformance):
    name = "cosine"


class TestSquaredCosCapV2Schedule(ScheduleConformance):
    name = "cosine"
    params = {"num_timesteps": 50, "min_beta": 0.0, "max_beta": 0.999, "dtype": "float64"}


class TestScaledLinearSchedule(ScheduleConformance):
    name = "scaled_linear"


class TestSimpleUNet(ModelConformance):
    name = "simple_unet"
    params = TINY_MODELS["simple_unet"]


class TestFiLMUNet(ModelConformance):
    name = "film_unet"
    params = TINY_MODELS["film_unet"]


class TestBlockUNet(ModelConformance):
    name = "block_unet"
    params = TINY_MODELS["block_unet"]


class TestNaiveUnet(ModelConformance):
    name = "naive_unet"
    params = TINY_MODELS["naive_unet"]


class TestGuidedStudent(ModelConformance):
    name = "guided_student"
    params = {"teacher": {"name": "simple_unet", **TINY_MODELS["simple_unet"], "in_channels": 1, "num_classes": 3}}


class TestDummyEps(ModelConformance):
    name = "dummy_eps"
    params = TINY_MODELS["dummy_eps"]
    num_classes = None  # time-blind, so it cannot be conditioned


class TestDDPM(SamplerConformance):
    name = "ddpm"


class TestDDPMUnclippedFixedLarge(SamplerConformance):
    name = "ddpm"
    params = {"variance_type": "fixed_large", "clip_sample": "none"}


class TestDDIM(SamplerConformance):
    name = "ddim"


class TestDDIMStochasticOnCosine(SamplerConformance):
    name = "ddim"
    params = {"eta": 1.0, "clip_sample": "clip_rederive_eps"}
    schedule = ("cosine", {"num_timesteps": 60})
    num_inference_steps = 7



class TestDistilled(SamplerConformance):
    name = "distilled"


class TestDistilledTwoStepDefaultClipped(SamplerConformance):
    name = "distilled"
    params = {"num_inference_steps": 2, "clip_sample": "clip"}
    num_inference_steps = 2


class TestDPMSolverPP(SamplerConformance):
    name = "dpm_solver_pp"


class TestDPMSolverPPTrailingSigmaMin(SamplerConformance):
    name = "dpm_solver_pp"
    params = {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}

class TestCFG(GuidanceConformance):
    name = "cfg"


class TestCFGInterval(GuidanceConformance):
    name = "cfg_interval"
    params = {"scale": 3.0, "sigma_low": 0.2, "sigma_high": 1.0}  # inside the tiny schedule's σ range


class TestCFGRescale(GuidanceConformance):
    name = "cfg_rescale"


class TestAPG(GuidanceConformance):
    name = "apg"
    params = {"scale": 4.0, "momentum": -0.5, "norm_threshold": 1.0, "eta": 0.0}


def test_every_built_in_schedule_model_sampler_and_guidance_is_checked_here():
    suites = {"schedule": ScheduleConformance, "model": ModelConformance, "sampler": SamplerConformance,
              "guidance": GuidanceConformance}
    checked = {
        (kind, cls.name)
        for cls in globals().values()
        for kind, suite in suites.items()
        if isinstance(cls, type) and issubclass(cls, suite) and cls is not suite
    }
    built_in = {
        (kind, name)
        for kind in suites
        for name, entry in plugins.registry(kind).items()
        if entry.package.startswith("minild ")
    }
    assert built_in, "no built-in stage found"
    assert built_in - checked == set(), "add a conformance class for every built-in stage"
