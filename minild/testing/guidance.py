"""``GuidanceConformance``: the conformance suite for guidance plugins (see ``minild.testing``).

    from minild.testing import GuidanceConformance

    class TestMyGuidance(GuidanceConformance):
        name = "my_guidance"
        params = {"scale": 3.0, "strength": 0.5}
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import minild
from minild.testing.base import DEVICES, Conformance, check_plain_keyword_params, seeded


class GuidanceConformance(Conformance):
    """A guidance object takes ``scale`` and plain keyword params, binds to a schedule into a
    fresh guider per run, combines ``[B, C, H, W]`` eps on their dtype and device, is the
    conditional eps at scale 1, and guides a tiny class-conditional pipeline with every
    built-in sampler. ``params`` must include a ``scale`` other than 1."""

    kind = "guidance"
    params: dict[str, Any] = {"scale": 3.0}
    schedule: tuple[str, dict[str, Any]] = ("linear", {"num_timesteps": 100})
    shape: tuple[int, int, int, int] = (2, 1, 8, 8)
    samplers: tuple[str, ...] = ("ddpm", "ddim", "dpm_solver_pp")
    num_inference_steps: int = 4

    def make(self, **extra: Any):
        return minild.create("guidance", self.name, **{**self.params, **extra})

    def noise_schedule(self) -> minild.NoiseSchedule:
        name, params = self.schedule
        return minild.create("schedule", name, **params)

    def bound(self, **extra: Any):
        return self.make(**extra).bind(self.noise_schedule())

    def inputs(self, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """eps_cond, eps_uncond and x, each ``[B, C, H, W]``."""
        generator = seeded(seed)
        return [torch.randn(self.shape, generator=generator, dtype=dtype).to(device) for _ in range(3)]

    def timesteps(self) -> list[int]:
        num_timesteps = self.noise_schedule().num_timesteps
        return list(range(num_timesteps - 1, -1, -max(1, num_timesteps // 10)))  # T−1 … 0, ten of them

    def run(self, guider, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The guider over a chain of steps, at those where it asks for both passes: one eps each."""
        return [eps for _, eps in self.run_with_inputs(guider, seed, device, dtype)]

    def run_with_inputs(self, guider, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """``(eps_cond, guided eps)`` for each step of ``run``."""
        outputs = []
        for i, t in enumerate(self.timesteps()):
            if guider.needs_uncond(t) and getattr(guider, "needs_cond", lambda t: True)(t):
                eps_cond, eps_uncond, x = self.inputs(seed + i, device, dtype)
                t_batch = torch.full((self.shape[0],), t, dtype=torch.long, device=device)
                outputs.append((eps_cond, guider(eps_cond, eps_uncond, t=t_batch, x=x)))
        return outputs

    def test_factory_takes_scale_and_keyword_plain_data(self):
        factory = self.registration().factory
        check_plain_keyword_params(factory)
        assert "scale" in inspect.signature(factory).parameters, "every guidance factory takes scale"
        assert self.params.get("scale", 1.0) != 1.0, "set params['scale'] to a value other than 1.0"

    def test_records_its_scale_and_binding_leaves_it_unchanged(self):
        guidance = self.make(scale=2.5)
        assert guidance.scale == 2.5
        before = dict(vars(guidance)) if hasattr(guidance, "__dict__") else None
        guider = guidance.bind(self.noise_schedule())
        assert callable(guider) and callable(guider.needs_uncond)
        if before is not None:
            assert set(vars(guidance)) == set(before), "bind() must not change the guidance object itself"

    def test_needs_uncond_answers_a_bool_at_every_timestep_and_guides_somewhere(self):
        guider = self.bound()
        answers = [guider.needs_uncond(t) for t in range(self.noise_schedule().num_timesteps)]
        assert all(isinstance(answer, bool) for answer in answers), "needs_uncond must return True or False"
        assert any(answers), f"at scale {self.params['scale']} the guidance never asks for the unconditional pass"
        assert self.run(self.bound()), "no step asked for both passes"

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_eps_has_the_shape_dtype_and_device_of_its_inputs(self, device, dtype):
        for eps in self.run(self.bound(), device=device, dtype=dtype):
            assert eps.shape == self.shape, f"eps has shape {tuple(eps.shape)}, expected {self.shape}"
            assert eps.dtype == dtype and eps.device.type == device, f"eps is {eps.dtype} on {eps.device}"
            assert bool(torch.isfinite(eps).all()), "eps has NaN or inf entries"

    def test_scale_one_is_the_conditional_eps(self):
        guider = self.bound(scale=1.0)
        for t in self.timesteps():
            if not guider.needs_uncond(t):
                continue  # the pipeline then uses eps_cond as it is
            eps_cond, eps_uncond, x = self.inputs(t)
            eps = guider(eps_cond, eps_uncond, t=torch.full((self.shape[0],), t), x=x)
            torch.testing.assert_close(eps, eps_cond, msg=f"at scale 1 and t={t} the eps is not eps_cond")

    def test_guidance_changes_the_eps(self):
        pairs = self.run_with_inputs(self.bound())
        assert any(not torch.allclose(eps, eps_cond) for eps_cond, eps in pairs), "the guided eps is always eps_cond"

    def test_same_inputs_give_the_same_eps(self):
        first, second = self.run(self.bound()), self.run(self.bound())
        assert all(torch.equal(a, b) for a, b in zip(first, second)), "two fresh guiders disagree"

    def test_state_starts_afresh_with_every_bind(self):
        guidance = self.make()
        used = guidance.bind(self.noise_schedule())
        self.run(used, seed=5)  # leaves whatever state the guider keeps
        again = guidance.bind(self.noise_schedule())
        fresh = self.make().bind(self.noise_schedule())
        assert all(torch.equal(a, b) for a, b in zip(self.run(again), self.run(fresh))), (
            "a guider bound after another run differs from a fresh one: reset per-run state in bind()"
        )

    @pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver_pp"])
    def test_guides_a_class_conditional_pipeline_by_name_and_round_trips(self, sampler, tmp_path):
        if sampler not in self.samplers:
            pytest.skip(f"{sampler} is not in {type(self).__name__}.samplers")
        schedule_name, schedule_params = self.schedule
        config = {
            "schedule": {"name": schedule_name, **schedule_params},
            "model": {"name": "simple_unet", "in_channels": self.shape[1], "base_channels": 8,
                      "channel_mults": [1, 2], "time_embedding_dim": 16, "norm_groups": 4, "num_classes": 3},
            "sampler": {"name": sampler},
            "guidance": {"name": self.name, **self.params},
            "image_shape": list(self.shape[1:]),
            "train": {"hooks": [], "device": "cpu"},
        }
        pipe = minild.Pipeline.from_config(config)
        kwargs = {"class_labels": [0, 2], "num_inference_steps": self.num_inference_steps, "seed": 0}
        images = pipe.generate(**kwargs)
        assert images.shape == (2, *self.shape[1:]) and bool(torch.isfinite(images).all())
        pipe.save_pretrained(tmp_path)
        reloaded = minild.Pipeline.from_pretrained(tmp_path)
        assert reloaded.config.guidance.to_dict() == {"name": self.name, **self.params}
        assert torch.equal(reloaded.generate(**kwargs), images)
