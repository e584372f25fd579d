"""The conformance checks of the optional step-wise sampler interface (``timesteps``, ``step``,
``state_scale``), mixed into ``minild.testing.SamplerConformance``; skipped for samplers without it."""

from __future__ import annotations

import pytest
import torch

from minild.testing.base import seeded, toy_eps


class StepwiseSamplerChecks:
    """Driving ``timesteps`` and ``step`` by hand, as ``MinildScheduler`` does inside a diffusers
    pipeline, gives what ``sample`` gives. Expects ``make()``, ``shape`` and ``num_inference_steps``."""

    def _stepwise_sampler(self):
        sampler = self.make()
        if not (callable(getattr(sampler, "timesteps", None)) and callable(getattr(sampler, "step", None))):
            pytest.skip("no step-wise interface (optional: needed only to drive diffusers pipelines)")
        return sampler

    def test_timesteps_are_python_ints_in_range_noisiest_first(self):
        sampler = self._stepwise_sampler()
        timesteps = sampler.timesteps(self.num_inference_steps)
        assert timesteps and all(type(t) is int for t in timesteps), f"got {timesteps!r}"
        assert all(0 <= t < sampler.schedule.num_timesteps for t in timesteps)
        assert all(a > b for a, b in zip(timesteps, timesteps[1:])), "the chain must run from noisy to clean"

    def test_step_by_step_equals_sample(self):
        latents = torch.randn(self.shape, generator=seeded(1))
        expected = self.make().sample(toy_eps, self.shape, num_inference_steps=self.num_inference_steps,
                                      latents=latents.clone(), generator=seeded(2))
        sampler = self._stepwise_sampler()
        scale = getattr(sampler, "state_scale", lambda t: 1.0)
        timesteps = sampler.timesteps(self.num_inference_steps)
        generator = seeded(2)
        x = latents * scale(timesteps[0])
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            eps = toy_eps(x / scale(t), torch.full((len(x),), t, dtype=torch.long))
            x, x0_pred = sampler.step(eps, t, x, t_prev=t_prev, generator=generator)
            assert x.shape == x0_pred.shape == self.shape
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
