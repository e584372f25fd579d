"""Noise schedules: the built-in linear, scaled-linear and cosine betas against diffusers and the seeds."""

import inspect
import math

import pytest
import torch
from diffusers import DDPMScheduler

import minild

T = 1000


def diffusers_scheduler(**config):
    return DDPMScheduler(num_train_timesteps=T, **config)


def seeds_cosine_betas(timesteps, s=0.008):
    """The seeds' Improved-DDPM cosine schedule, written out as they give it (float32)."""
    steps = timesteps + 1
    x = torch.linspace(0, timesteps, steps)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0.0001, 0.9999)


def test_builtin_schedules_are_registered():
    assert {"linear", "scaled_linear", "cosine"} <= set(minild.available("schedule"))


def test_linear_matches_diffusers_betas_and_alphas_cumprod():
    ours = minild.create("schedule", "linear", num_timesteps=T, beta_start=1e-4, beta_end=0.02)
    theirs = diffusers_scheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas, theirs.alphas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_scaled_linear_matches_diffusers_betas_and_alphas_cumprod():
    ours = minild.create("schedule", "scaled_linear", num_timesteps=T, beta_start=0.00085, beta_end=0.012)
    theirs = diffusers_scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_scaled_linear_is_not_the_linear_schedule():
    scaled = minild.create("schedule", "scaled_linear", beta_start=0.00085, beta_end=0.012)
    linear = minild.create("schedule", "linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(scaled.betas[[0, -1]], linear.betas[[0, -1]])  # same end points
    assert (scaled.betas[1:-1] < linear.betas[1:-1]).all()  # squares of a line bend below the line


def test_cosine_defaults_follow_the_seeds_formula():
    ours = minild.create("schedule", "cosine")
    torch.testing.assert_close(ours.betas, seeds_cosine_betas(T), rtol=0, atol=1e-7)
    assert ours.betas.min() >= 1e-4 and ours.betas.max() <= 0.9999


def test_cosine_unclipped_float64_matches_diffusers_squaredcos_cap_v2():
    ours = minild.create("schedule", "cosine", min_beta=0.0, max_beta=0.999, dtype="float64")
    theirs = diffusers_scheduler(beta_schedule="squaredcos_cap_v2")
    assert (ours.betas - theirs.betas).abs().max() <= 1e-6
    assert (ours.alphas_cumprod - theirs.alphas_cumprod).abs().max() <= 1e-6


def test_cosine_seed_defaults_are_a_different_schedule_from_squaredcos_cap_v2():
    ours = minild.create("schedule", "cosine")
    theirs = diffusers_scheduler(beta_schedule="squaredcos_cap_v2")
    assert (ours.betas - theirs.betas).abs().max() > 1e-4  # clipped at 1e-4 … 0.9999, not 0 … 0.999


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedule_exposes_its_tensors(name):
    schedule = minild.create("schedule", name, num_timesteps=50)
    assert schedule.num_timesteps == 50
    for field in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
        tensor = getattr(schedule, field)
        assert tensor.shape == (50,) and tensor.dtype == torch.float32, field
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(schedule.alphas, 0))
    assert schedule.alphas_cumprod_prev[0] == 1
    torch.testing.assert_close(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_posterior_variance_is_beta_tilde(name):
    schedule = minild.create("schedule", name)
    betas = schedule.betas.double()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    expected = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # DDPM eq. 7
    torch.testing.assert_close(schedule.posterior_variance.double(), expected, rtol=1e-4, atol=1e-7)
    assert schedule.posterior_variance[0] == 0


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_add_noise_matches_diffusers(name):
    schedule = minild.create("schedule", name)
    theirs = diffusers_scheduler(trained_betas=schedule.betas.numpy())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=generator)
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 500, 999])
    expected = theirs.add_noise(x0, noise, t)
    assert (schedule.add_noise(x0, noise, t) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedule_parameters_are_annotated_plain_data(name):
    factory = minild.plugins.lookup("schedule", name).factory
    for parameter in inspect.signature(factory).parameters.values():
        assert parameter.annotation is not inspect.Parameter.empty, parameter.name
        assert isinstance(parameter.default, (int, float, str)), parameter.name


@pytest.mark.parametrize(
    "name, params",
    [
        ("linear", {"num_timesteps": 0}),
        ("linear", {"num_timesteps": 10.5}),
        ("linear", {"beta_start": 0.0}),
        ("linear", {"beta_start": 0.03, "beta_end": 0.02}),
        ("linear", {"beta_end": 1.0}),
        ("scaled_linear", {"num_timesteps": 0}),
        ("scaled_linear", {"beta_start": 0.02, "beta_end": 0.012}),
        ("cosine", {"num_timesteps": 0}),
        ("cosine", {"s": -0.1}),
        ("cosine", {"min_beta": 0.5, "max_beta": 0.4}),
        ("cosine", {"max_beta": 1.0}),
        ("cosine", {"dtype": "float16"}),
    ],
)
def test_bad_schedule_parameters_raise(name, params):
    with pytest.raises(ValueError):
        minild.create("schedule", name, **params)
