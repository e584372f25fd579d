"""minild-euler against minild's conformance suite, and its sampler against diffusers."""

from __future__ import annotations

import pytest
import torch

import minild
from minild.testing import ModelConformance, SamplerConformance, seeded, toy_eps


class TestEulerAncestral(SamplerConformance):
    name = "euler_ancestral"


class TestPlainEuler(SamplerConformance):
    name = "euler_ancestral"
    params = {"eta": 0.0}
    schedule = ("cosine", {"num_timesteps": 80})


class TestTinyEps(ModelConformance):
    name = "tiny_eps"
    params = {"channels": 8, "embedding_dim": 16}


def test_both_stages_come_from_this_package():
    for kind, name in (("sampler", "euler_ancestral"), ("model", "tiny_eps")):
        entry = minild.plugins.lookup(kind, name)
        assert entry.plugin == "euler" and entry.package.startswith("minild-euler ")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("num_inference_steps", [10, 50])
def test_matches_diffusers_euler_ancestral_full_loop(schedule, num_inference_steps):
    from diffusers import EulerAncestralDiscreteScheduler

    ours_schedule = minild.create("schedule", schedule, num_timesteps=1000)
    sampler = minild.create("sampler", "euler_ancestral", ours_schedule)
    shape = (2, 1, 4, 4)
    ours = sampler.sample(toy_eps, shape, num_inference_steps=num_inference_steps, generator=seeded(3))

    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, trained_betas=ours_schedule.betas.numpy(), prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=0,
    )
    scheduler.set_timesteps(num_inference_steps)
    generator = seeded(3)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = toy_eps(scheduler.scale_model_input(x, t), t.long().repeat(shape[0]))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    assert (ours - x).abs().max() <= 1e-5


def test_eta_zero_is_deterministic_whatever_the_generator():
    sampler = minild.create("sampler", "euler_ancestral", minild.create("schedule", "linear"), eta=0.0)
    latents = torch.randn(2, 1, 4, 4, generator=seeded(1))
    first, second = (sampler.sample(toy_eps, (2, 1, 4, 4), latents=latents, generator=seeded(s)) for s in (5, 6))
    assert torch.equal(first, second)


def test_bad_eta_and_conditioning_are_errors_for_users():
    with pytest.raises(ValueError, match="eta must be a number in"):
        minild.create("sampler", "euler_ancestral", minild.create("schedule", "linear"), eta=2.0)
    model = minild.create("model", "tiny_eps", channels=8, embedding_dim=16)
    with pytest.raises(ValueError, match="no cross-attention"):
        model(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), context=torch.zeros(1, 3, 4))


def test_a_config_trains_and_samples_with_both_stages_by_name():
    config = {
        "schedule": {"name": "linear", "num_timesteps": 100},
        "model": {"name": "tiny_eps", "channels": 8, "embedding_dim": 16, "num_classes": 10},
        "sampler": {"name": "euler_ancestral"},
        "data": {"dataset": "digits", "split": "test"},
        "train": {"batch_size": 8, "max_steps": 2, "hooks": [], "device": "cpu"},
    }
    pipe = minild.Pipeline.from_config(config)
    result = pipe.train()
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    images = pipe.generate(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=5, seed=0)
    assert images.shape == (2, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
