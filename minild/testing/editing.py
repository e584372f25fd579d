"""The conformance checks of the optional start part-way down the chain (``sample(start_step=…)``)
that image editing needs, mixed into ``minild.testing.SamplerConformance``; skipped for samplers without it."""

from __future__ import annotations

import inspect

import pytest
import torch


class EditingSamplerChecks:
    """``sample(latents=x_t, start_step=k)`` walks exactly ``timesteps(n)[k:]`` from the given state,
    as stepping by hand from there does. Expects ``make()``, ``shape`` and ``num_inference_steps``."""

    def _editing_sampler(self):
        sampler = self.make()
        parameters = inspect.signature(sampler.sample).parameters
        if "start_step" not in parameters:
            pytest.skip("sample() takes no start_step (optional: needed only for generate(image=...))")
        assert callable(getattr(sampler, "timesteps", None)), (
            "a sampler that takes start_step needs timesteps(num_inference_steps): the pipeline noises the image "
            "to timesteps(n)[start_step]"
        )
        return sampler

    def _start(self) -> int:
        return self.num_inference_steps // 2

    def _noised(self, sampler, start_step: int) -> torch.Tensor:
        from minild.testing.base import seeded

        t = sampler.timesteps(self.num_inference_steps)[start_step]
        alpha_cumprod = sampler.schedule.alphas_cumprod[t]
        x0 = torch.rand(self.shape, generator=seeded(5)) * 2 - 1
        noise = torch.randn(self.shape, generator=seeded(6))
        return alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * noise

    def test_start_step_zero_is_the_whole_chain(self):
        from minild.testing.base import seeded, toy_eps

        sampler = self._editing_sampler()
        latents = torch.randn(self.shape, generator=seeded(1))
        whole = sampler.sample(toy_eps, self.shape, num_inference_steps=self.num_inference_steps,
                               latents=latents.clone(), generator=seeded(2))
        started = self.make().sample(toy_eps, self.shape, num_inference_steps=self.num_inference_steps,
                                     latents=latents.clone(), generator=seeded(2), start_step=0)
        assert torch.equal(whole, started), "start_step=0 must be the ordinary chain"

    def test_start_step_walks_the_last_timesteps_of_the_chain(self):
        from minild.testing.base import seeded, toy_eps

        sampler = self._editing_sampler()
        start = self._start()
        expected = sampler.timesteps(self.num_inference_steps)[start:]
        seen, steps = [], []

        def model_fn(x, t):
            seen.append(int(t[0]))
            return toy_eps(x, t)

        self.make().sample(model_fn, self.shape, num_inference_steps=self.num_inference_steps,
                           latents=self._noised(sampler, start), generator=seeded(2), start_step=start,
                           callback=steps.append)
        assert seen == expected, f"start_step={start} evaluated the model at {seen}, expected timesteps(n)[{start}:] = {expected}"
        assert [info["i"] for info in steps] == list(range(len(expected))), "the callback's i counts the steps taken from 0"

    def test_start_step_equals_stepping_by_hand_from_there(self):
        from minild.testing.base import seeded, toy_eps

        sampler = self._editing_sampler()
        if not callable(getattr(sampler, "step", None)):
            pytest.skip("no step-wise interface to compare with")
        start = self._start()
        latents = self._noised(sampler, start)
        expected = self.make().sample(toy_eps, self.shape, num_inference_steps=self.num_inference_steps,
                                      latents=latents.clone(), generator=seeded(2), start_step=start)
        scale = getattr(sampler, "state_scale", lambda t: 1.0)
        timesteps = sampler.timesteps(self.num_inference_steps)[start:]
        generator, x = seeded(2), latents * scale(timesteps[0])
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            eps = toy_eps(x / scale(t), torch.full((len(x),), t, dtype=torch.long))
            x, _ = sampler.step(eps, t, x, t_prev=t_prev, generator=generator)
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("start_step", [-1, "end", 1.5])
    def test_start_step_outside_the_chain_is_a_value_error(self, start_step):
        from minild.testing.base import seeded, toy_eps

        sampler = self._editing_sampler()
        if start_step == "end":
            start_step = self.num_inference_steps
        with pytest.raises(ValueError, match="start_step"):
            sampler.sample(toy_eps, self.shape, num_inference_steps=self.num_inference_steps,
                           latents=torch.randn(self.shape), generator=seeded(), start_step=start_step)
