"""minild samplers as diffusers schedulers: minild:ddpm, minild:ddim and minild:dpm_solver_pp ≡ their diffusers
counterparts inside a tiny SDXL pipeline; scheduler names with options."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

import minild
from minild.lab.scheduler_adapter import MinildScheduler, make_scheduler, parse_scheduler_name, scheduler_names
from minild.lab.tiny_sdxl import SDXL_BASE_SCHEDULER_CONFIG


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_config():
    return EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER_CONFIG).config


def generate(pipe, scheduler, seeds=(0, 1), **kwargs):
    pipe.scheduler = scheduler
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(["a red cube", "a blue ball"], num_inference_steps=3, guidance_scale=5.0, generator=generators,
                output_type="np", **kwargs).images


def test_minild_ddim_gives_the_same_sdxl_images_as_diffusers_ddim(sdxl_pipe):
    config = sdxl_pipe.scheduler.config
    theirs = generate(sdxl_pipe, DDIMScheduler.from_config(config))
    ours = generate(sdxl_pipe, make_scheduler("minild:ddim", config))
    assert theirs.shape == (2, 64, 64, 3) and theirs.std() > 0.01
    assert np.abs(ours - theirs).max() <= 1e-4


def test_minild_ddim_with_eta_matches_diffusers_ddim_noise_draws(sdxl_pipe):
    config = sdxl_pipe.scheduler.config
    theirs = generate(sdxl_pipe, DDIMScheduler.from_config(config), eta=1.0)
    ours = generate(sdxl_pipe, make_scheduler("minild:ddim", config, eta=1.0))
    deterministic = generate(sdxl_pipe, make_scheduler("minild:ddim", config))
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - deterministic).max() > 1e-3  # the noise really was drawn


@pytest.mark.parametrize(
    "name, counterpart", [("ddpm", DDPMScheduler), ("dpm_solver_pp", DPMSolverMultistepScheduler)]
)
def test_every_builtin_sampler_gives_the_same_sdxl_images_as_its_diffusers_counterpart(sdxl_pipe, name, counterpart):
    config = sdxl_pipe.scheduler.config
    theirs = generate(sdxl_pipe, counterpart.from_config(config))
    ours = generate(sdxl_pipe, make_scheduler(f"minild:{name}", config))
    assert theirs.std() > 0.01 and np.abs(ours - theirs).max() <= 1e-4


def test_minild_ddpm_draws_its_noise_per_step_with_the_pipeline_generators(sdxl_pipe):
    config = sdxl_pipe.scheduler.config
    ours, other_seeds = (generate(sdxl_pipe, make_scheduler("minild:ddpm", config), seeds=seeds)
                         for seeds in ((0, 1), (0, 2)))
    assert np.abs(ours[0] - other_seeds[0]).max() == 0  # image 0 depends on its own generator only
    assert np.abs(ours[1] - other_seeds[1]).max() > 1e-3


@pytest.mark.parametrize("name, n", [("ddpm", 30), ("dpm_solver_pp", 30), ("dpm_solver_pp", 7)])
def test_sdxl_chains_are_diffusers_chains(name, n):
    counterpart = {"ddpm": DDPMScheduler, "dpm_solver_pp": DPMSolverMultistepScheduler}[name]
    ours, theirs = make_scheduler(f"minild:{name}", sdxl_config()), counterpart.from_config(sdxl_config())
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert torch.equal(ours.timesteps, theirs.timesteps)


def test_scheduler_names_carry_sampler_options():
    assert parse_scheduler_name("minild:ddim:eta=1,clip_sample=clip") == ("ddim", {"eta": 1, "clip_sample": "clip"})
    assert parse_scheduler_name("minild:ddim:eta=0.5, steps_offset=2 ,x=true") == (
        "ddim", {"eta": 0.5, "steps_offset": 2, "x": True})
    assert parse_scheduler_name("minild:dpm_solver_pp") == ("dpm_solver_pp", {})
    scheduler = make_scheduler("minild:ddim:eta=1", sdxl_config())
    assert scheduler.sampler.eta == 1.0 and scheduler.config.sampler_params == {"eta": 1}
    scheduler = make_scheduler("minild:dpm_solver_pp:final_sigmas_type=sigma_min", sdxl_config())
    assert scheduler.sampler.final_sigmas_type == "sigma_min" and scheduler.sampler.steps_offset == 1


def test_unknown_sampler_options_are_one_line_errors_naming_the_accepted_ones():
    with pytest.raises(ValueError, match="'ddim' has no option 'etaa'; its options: eta, clip_sample") as error:
        make_scheduler("minild:ddim:etaa=1", sdxl_config())
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="must be key=value"):
        make_scheduler("minild:ddim:eta", sdxl_config())


def test_adapter_reads_sdxl_scheduler_config():
    scheduler = make_scheduler("minild:ddim", sdxl_config())
    assert isinstance(scheduler, MinildScheduler)
    assert scheduler.sampler.steps_offset == 1 and scheduler.sampler.final_alpha_cumprod == "first"
    reference = DDIMScheduler.from_config(sdxl_config())
    scheduler.set_timesteps(30)
    reference.set_timesteps(30)
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1


def test_adapter_add_noise_matches_diffusers():
    scheduler, reference = make_scheduler("minild:ddim", sdxl_config()), DDIMScheduler.from_config(sdxl_config())
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))


def test_adapter_config_saves_and_reloads(tmp_path):
    scheduler = make_scheduler("minild:ddim", sdxl_config(), eta=0.5)
    scheduler.save_pretrained(tmp_path)
    reloaded = MinildScheduler.from_pretrained(tmp_path)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(scheduler.config)
    assert reloaded.sampler.eta == 0.5 and reloaded.sampler.steps_offset == 1


def test_adapter_steps_follow_set_begin_index():
    scheduler = make_scheduler("minild:ddim", sdxl_config())
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)  # an img2img pipeline that skips the two noisiest steps
    x = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    ours = scheduler.step(eps, scheduler.timesteps[2], x).prev_sample
    t, t_prev = scheduler.sampler.timesteps(4)[2:4]
    expected, _ = scheduler.sampler.step(eps, t, x, t_prev=t_prev)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"timestep_spacing": "trailing"}, "timestep_spacing"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ],
)
def test_unsupported_scheduler_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler("minild:ddim", {**SDXL_BASE_SCHEDULER_CONFIG, **change})


class NoOffsetSampler:
    """A step-wise sampler without a steps_offset option."""

    def __init__(self, schedule, *, eta: float = 0.0):
        self.inner = minild.create("sampler", "ddim", schedule, eta=eta)

    def timesteps(self, num_inference_steps):
        return self.inner.timesteps(num_inference_steps)

    def step(self, eps, t, x, *, t_prev, generator=None):
        return self.inner.step(eps, t, x, t_prev=t_prev, generator=generator)


class WholeLoopSampler:
    def __init__(self, schedule):
        self.schedule = schedule

    def sample(self, model_fn, shape, **kwargs):
        return torch.zeros(shape)


@pytest.fixture
def test_samplers():
    class Plugin:
        @minild.hookimpl
        def register_samplers(self, register):
            register("test_no_offset", NoOffsetSampler)
            register("test_whole_loop", WholeLoopSampler)

    name = minild.register_plugin(Plugin(), name="test-adapter-samplers")
    yield
    minild.unregister_plugin(name)


def test_sampler_without_an_option_the_config_needs_is_refused(test_samplers):
    with pytest.raises(ValueError, match="'test_no_offset' has no 'steps_offset'"):
        make_scheduler("minild:test_no_offset", sdxl_config())
    config = {**SDXL_BASE_SCHEDULER_CONFIG, "steps_offset": 0}  # set_alpha_to_one=False is not needed
    assert make_scheduler("minild:test_no_offset", config).sampler.inner.steps_offset == 0


def test_sampler_without_a_step_interface_is_refused(test_samplers):
    with pytest.raises(ValueError, match="no timesteps\\(\\) method"):
        make_scheduler("minild:test_whole_loop", sdxl_config())


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "dpm++2m_karras"])
def test_diffusers_scheduler_names_keep_the_model_config(name):
    scheduler = make_scheduler(name, sdxl_config())
    assert scheduler.config.steps_offset == 1 and scheduler.config.beta_schedule == "scaled_linear"


def test_unknown_scheduler_names_list_the_choices():
    with pytest.raises(ValueError, match="minild:ddim"):
        make_scheduler("heun-fast", sdxl_config())
    with pytest.raises(minild.PluginError, match="unknown sampler 'nope'"):
        make_scheduler("minild:nope", sdxl_config())
    assert {"ddim", "euler", "dpm++2m", "minild:ddim"} <= set(scheduler_names())
