"""The plugin conformance suite: pytest test classes any schedule, model, sampler or guidance
plugin subclasses to check itself against the contract in ``minild.hookspecs``.

Subclass one of ``ScheduleConformance``, ``ModelConformance``, ``SamplerConformance``,
``GuidanceConformance`` (defined in ``minild.testing.guidance``) in a
module pytest collects, name the subclass ``Test…`` and set ``name`` (the registered name)
and ``params`` (small keyword arguments, so the checks run in seconds)::

    from minild.testing import SamplerConformance

    class TestEulerAncestral(SamplerConformance):
        name = "euler_ancestral"
        params = {"eta": 1.0}

Every test method then runs against your plugin, found by name through the plugin registry
exactly as a config finds it. The checks cover shapes, dtype and device propagation (on every
device this machine has), determinism with a generator, and classifier-free-guidance
compatibility. Needs pytest (``pip install "minild[test]"``).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import minild
from minild.pipeline.guidance import cfg_model_fn
from minild.testing.base import (  # noqa: F401  (helpers re-exported for plugin tests)
    DEVICES,
    PLAIN_DATA,
    Conformance as _Conformance,
    available_devices,
    check_plain_keyword_params,
    seeded,
    toy_eps,
)
from minild.testing.editing import EditingSamplerChecks
from minild.testing.guidance import GuidanceConformance  # noqa: F401
from minild.testing.stepwise import StepwiseSamplerChecks

# ---------------------------------------------------------------------------- schedules


class ScheduleConformance(_Conformance):
    """A schedule is data: 1-D float32 tensors of length T that follow from the betas."""

    kind = "schedule"
    params = {"num_timesteps": 50}

    def make(self) -> minild.NoiseSchedule:
        return minild.create("schedule", self.name, **self.params)

    def test_factory_takes_keyword_plain_data(self):
        check_plain_keyword_params(self.registration().factory)

    def test_returns_a_noise_schedule_of_1d_float32_tensors(self):
        schedule = self.make()
        assert isinstance(schedule, minild.NoiseSchedule), f"got {type(schedule).__name__}, not a NoiseSchedule"
        for field in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
            tensor = getattr(schedule, field)
            assert tensor.shape == (schedule.num_timesteps,), f"{field} has shape {tuple(tensor.shape)}"
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", f"{field}: {tensor.dtype} on {tensor.device}"
        if "num_timesteps" in self.params:
            assert schedule.num_timesteps == self.params["num_timesteps"]

    def test_alphas_cumprod_falls_from_near_one_towards_zero(self):
        alphas_cumprod = self.make().alphas_cumprod
        assert bool((alphas_cumprod[1:] <= alphas_cumprod[:-1]).all()), "ᾱ_t must not increase with t"
        assert 0 < alphas_cumprod[-1] < alphas_cumprod[0] <= 1

    def test_every_tensor_follows_from_the_betas(self):
        schedule = self.make()
        rebuilt = minild.NoiseSchedule.from_betas(schedule.betas)
        for field in ("alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
            torch.testing.assert_close(getattr(schedule, field), getattr(rebuilt, field), msg=field)

    def test_same_params_give_the_same_schedule(self):
        assert torch.equal(self.make().betas, self.make().betas)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_add_noise_keeps_shape_dtype_and_device(self, device, dtype):
        schedule = self.make()
        x0 = torch.rand(3, 1, 4, 4, dtype=dtype, device=device) * 2 - 1
        noise = torch.randn(3, 1, 4, 4, dtype=dtype, device=device)
        t = torch.tensor([0, schedule.num_timesteps // 2, schedule.num_timesteps - 1], device=device)
        noisy = schedule.add_noise(x0, noise, t)
        assert noisy.shape == x0.shape and noisy.dtype == dtype and noisy.device.type == device
        assert (noisy[0] - x0[0]).abs().max() < (noisy[2] - x0[2]).abs().max(), "t = T−1 must be noisier than t = 0"


# ---------------------------------------------------------------------------- eps-models


class ModelConformance(_Conformance):
    """``model(x, t, class_labels=None, context=None) -> eps`` with eps shaped like x.

    ``image_shape`` is ``(C, H, W)`` of the inputs; ``num_classes`` (None skips the class and
    guidance checks) is added to ``params`` for the conditional checks.
    """

    kind = "model"
    image_shape: tuple[int, int, int] = (1, 16, 16)
    num_classes: int | None = 3
    num_timesteps: int = 1000
    tolerance: float = 1e-5

    def make(self, seed: int = 0, **extra: Any) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = {**self.params, **extra}
            if "in_channels" in inspect.signature(self.registration().factory).parameters:
                params.setdefault("in_channels", self.image_shape[0])
            return minild.create("model", self.name, **params).eval()

    def inputs(self, batch_size: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        generator = seeded(seed)
        x = torch.randn(batch_size, *self.image_shape, generator=generator)  # [B, C, H, W]
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)  # [B]
        return x, t

    def conditional(self) -> torch.nn.Module:
        if self.num_classes is None:
            pytest.skip(f"{self.name} is tested unconditional only (num_classes = None)")
        return self.make(num_classes=self.num_classes)

    def test_factory_takes_keyword_plain_data(self):
        check_plain_keyword_params(self.registration().factory)

    def test_eps_has_the_shape_of_x(self):
        x, t = self.inputs()
        with torch.no_grad():
            eps = self.make()(x, t)
        assert eps.shape == x.shape, f"eps has shape {tuple(eps.shape)}, x has {tuple(x.shape)}"
        assert bool(torch.isfinite(eps).all()), "eps has NaN or inf entries"

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_eps_follows_the_dtype_and_device_of_the_model(self, device, dtype):
        model = self.make().to(device=device, dtype=dtype)
        x, t = self.inputs()
        with torch.no_grad():
            eps = model(x.to(device=device, dtype=dtype), t.to(device))
        assert eps.dtype == dtype and eps.device.type == device, f"eps is {eps.dtype} on {eps.device}"

    def test_eval_forward_is_deterministic(self):
        model = self.make()
        x, t = self.inputs()
        with torch.no_grad():
            assert torch.equal(model(x, t), model(x, t)), "two eval-mode forwards on the same input differ"

    def test_samples_do_not_see_each_other_in_eval_mode(self):
        model = self.make()
        x, t = self.inputs()
        with torch.no_grad():
            batch, alone = model(x, t), model(x[1:2], t[1:2])
        torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=self.tolerance)

    def test_weights_round_trip_through_a_state_dict(self):
        model, other = self.make(seed=0), self.make(seed=1)
        other.load_state_dict(model.state_dict())
        x, t = self.inputs()
        with torch.no_grad():
            assert torch.equal(model(x, t), other(x, t))

    def test_gradients_flow_to_the_parameters(self):
        model = self.make().train()
        x, t = self.inputs()
        model(x, t).square().mean().backward()
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters()), (
            "no parameter received a gradient"
        )

    def test_unused_conditioning_is_a_value_error(self):
        model = self.make()
        x, t = self.inputs()
        if getattr(model, "cross_attention_dim", None) is None:
            with pytest.raises(ValueError):
                model(x, t, context=torch.randn(len(x), 4, 8))
        if getattr(model, "num_classes", None) is None:
            with pytest.raises(ValueError):
                model(x, t, class_labels=torch.zeros(len(x), dtype=torch.long))

    def test_class_model_exposes_num_classes_and_none_is_the_null_class(self):
        model = self.conditional()
        assert model.num_classes == self.num_classes, "set model.num_classes: the pipeline reads it"
        x, t = self.inputs()
        null = torch.full((len(x),), self.num_classes)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t), model(x, t, class_labels=null), rtol=0, atol=self.tolerance)

    def test_class_labels_change_eps(self):
        model = self.conditional()
        x, t = self.inputs()
        with torch.no_grad():
            first = model(x, t, class_labels=torch.zeros(len(x), dtype=torch.long))
            second = model(x, t, class_labels=torch.full((len(x),), self.num_classes - 1))
        assert not torch.allclose(first, second), "class_labels do not change eps"

    @pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
    def test_guidance_in_one_batched_forward_equals_two_separate_passes(self, guidance_scale):
        model = self.conditional()
        x, t = self.inputs()
        labels = torch.arange(len(x)) % self.num_classes
        cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.num_classes)}
        with torch.no_grad():
            guided = cfg_model_fn(model, cond, uncond, guidance_scale)(x, t)
            eps_cond, eps_uncond = model(x, t, **cond), model(x, t, **uncond)
        expected = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        torch.testing.assert_close(guided, expected, rtol=1e-4, atol=10 * self.tolerance)


# ---------------------------------------------------------------------------- samplers


class SamplerConformance(_Conformance, StepwiseSamplerChecks, EditingSamplerChecks):
    """``sampler.sample(model_fn, shape, ...)`` draws every random number through the
    generator, follows the latents' dtype and device, and works with a guided ``model_fn``.

    ``schedule`` is the ``(name, params)`` the sampler is built on.
    """

    kind = "sampler"
    schedule: tuple[str, dict[str, Any]] = ("linear", {"num_timesteps": 100})
    num_inference_steps: int = 10
    shape: tuple[int, int, int, int] = (2, 1, 8, 8)

    def make(self, **extra: Any):
        name, schedule_params = self.schedule
        schedule = minild.create("schedule", name, **schedule_params)
        return minild.create("sampler", self.name, schedule, **{**self.params, **extra})

    def draw(self, model_fn=toy_eps, shape=None, **kwargs) -> torch.Tensor:
        return self.make().sample(
            model_fn, shape or self.shape, num_inference_steps=self.num_inference_steps, **kwargs
        )

    def test_factory_takes_a_schedule_then_keyword_plain_data(self):
        factory = self.registration().factory
        first = next(iter(inspect.signature(factory).parameters.values()))
        assert first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD), (
            "a sampler factory takes the schedule as its first positional argument"
        )
        check_plain_keyword_params(factory, skip_first=True)

    def test_sample_has_the_requested_shape_and_is_finite(self):
        x0 = self.draw(generator=seeded())
        assert x0.shape == self.shape and x0.dtype == torch.float32, f"got {x0.dtype} {tuple(x0.shape)}"
        assert bool(torch.isfinite(x0).all()), "the sample has NaN or inf entries"

    def test_model_fn_gets_x_of_the_batch_and_int64_timesteps_in_range(self):
        seen = []

        def model_fn(x, t):
            seen.append((tuple(x.shape), t.dtype, tuple(t.shape), int(t.min()), int(t.max())))
            return toy_eps(x, t)

        self.draw(model_fn, generator=seeded())
        num_timesteps = self.make().schedule.num_timesteps
        assert seen, "model_fn was never called"
        for x_shape, t_dtype, t_shape, t_min, t_max in seen:
            assert x_shape == self.shape, f"model_fn got x of shape {x_shape}"
            assert t_dtype == torch.int64 and t_shape == (self.shape[0],), f"t must be [B] int64, got {t_dtype} {t_shape}"
            assert 0 <= t_min <= t_max < num_timesteps, f"t out of [0, {num_timesteps})"

    def test_same_seed_gives_the_same_sample_and_another_seed_another(self):
        first, second, other = (self.draw(generator=seeded(seed)) for seed in (7, 7, 8))
        assert torch.equal(first, second), "the same seed gave different samples: draw noise with the generator"
        assert not torch.equal(first, other), "different seeds gave the same sample"

    def test_global_rng_does_not_change_a_seeded_sample(self):
        torch.manual_seed(1)
        first = self.draw(generator=seeded(3))
        torch.manual_seed(2)
        assert torch.equal(first, self.draw(generator=seeded(3))), "the sample depends on the global RNG"

    def test_list_of_generators_makes_each_sample_independent_of_its_batch(self):
        batch_shape, single_shape = (3, *self.shape[1:]), (1, *self.shape[1:])
        batch = self.draw(shape=batch_shape, generator=[seeded(s) for s in (1, 2, 3)])
        alone = self.draw(shape=single_shape, generator=[seeded(2)])
        torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_sample_follows_the_dtype_and_device_of_the_latents(self, device, dtype):
        latents = torch.randn(self.shape, generator=seeded(), dtype=dtype).to(device)
        x0 = self.draw(generator=seeded(1), latents=latents)
        assert x0.dtype == dtype and x0.device.type == device, f"sample is {x0.dtype} on {x0.device}"

    def test_latents_set_the_starting_noise(self):
        latents = torch.randn(self.shape, generator=seeded(4))
        first = self.draw(generator=seeded(1), latents=latents)
        assert torch.equal(first, self.draw(generator=seeded(1), latents=latents.clone()))
        assert not torch.equal(first, self.draw(generator=seeded(1), latents=latents + 0.5))

    def test_callback_gets_every_step(self):
        steps = []
        out = self.draw(generator=seeded(), callback=steps.append)
        assert len(steps) == self.num_inference_steps, f"callback called {len(steps)} times"
        assert [info["i"] for info in steps] == list(range(self.num_inference_steps))
        for info in steps:
            assert {"i", "t", "x", "x0_pred"} <= set(info), f"callback info lacks {set('i t x x0_pred'.split()) - set(info)}"
            assert info["x"].shape == self.shape and info["x0_pred"].shape == self.shape
        torch.testing.assert_close(steps[-1]["x"], out)

    def test_bad_num_inference_steps_is_a_value_error(self):
        with pytest.raises(ValueError, match="num_inference_steps"):
            self.make().sample(toy_eps, self.shape, num_inference_steps=0, generator=seeded())

    def test_guided_class_conditional_pipeline_samples_by_name_and_round_trips(self, tmp_path):
        schedule_name, schedule_params = self.schedule
        config = {
            "schedule": {"name": schedule_name, **schedule_params},
            "model": {"name": "simple_unet", "in_channels": self.shape[1], "base_channels": 8,
                      "channel_mults": [1, 2], "time_embedding_dim": 16, "norm_groups": 4, "num_classes": 3},
            "sampler": {"name": self.name, **self.params},
            "image_shape": list(self.shape[1:]),
            "train": {"hooks": [], "device": "cpu"},
        }
        pipe = minild.Pipeline.from_config(config)
        kwargs = {"class_labels": [0, 2], "guidance_scale": 3.0, "num_inference_steps": self.num_inference_steps}
        images = pipe.generate(seed=0, **kwargs)
        assert images.shape == (2, *self.shape[1:]) and bool(torch.isfinite(images).all())
        pipe.save_pretrained(tmp_path)
        reloaded = minild.Pipeline.from_pretrained(tmp_path)
        assert reloaded.config.sampler.to_dict() == {"name": self.name, **self.params}
        assert torch.equal(reloaded.generate(seed=0, **kwargs), images)
