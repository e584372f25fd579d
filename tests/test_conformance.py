"""Every built-in schedule, eps-model and sampler passes minild's plugin conformance suite."""

from __future__ import annotations

from minild.testing import ModelConformance, SamplerConformance, ScheduleConformance
from tests.conftest import TINY_MODELS


class TestLinearSchedule(ScheduleConformance):
    name = "linear"


class TestCosineSchedule(ScheduleConformance):
    name = "cosine"


class TestSquaredCosCapV2Schedule(ScheduleConformance):
    name = "cosine"
    params = {"num_timesteps": 50, "min_beta": 0.0, "max_beta": 0.999, "dtype": "float64"}


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
