"""The guidance stage: each built-in method against a plain transcription of its paper's
equations, the pipeline's use of it (skipped passes, per-run state, every sampler, class, text
and latent conditioning) and its config key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import minild
from minild import hookimpl
from minild.config import ConfigError, load_config
from minild.pipeline.generation import guidance_spec
from minild.pipeline.guidance import cfg_model_fn
from minild.pipeline.guidance import noise_levels

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minild-euler"
METHODS = ["cfg", "cfg_interval", "cfg_rescale", "apg"]
SAMPLERS = ["ddpm", "ddim", "dpm_solver_pp"]
STEPS = 4


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def class_config(**overrides):
    config = {
        "schedule": {"name": "linear", "num_timesteps": 100},
        "model": {"name": "simple_unet", "in_channels": 1, "base_channels": 8, "channel_mults": [1, 2],
                  "time_embedding_dim": 16, "norm_groups": 4, "num_classes": 3},
        "sampler": {"name": "ddim"},
        "image_shape": [1, 8, 8],
        "train": {"hooks": [], "device": "cpu", "channels_last": False},
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def pipe():
    return minild.Pipeline.from_config(class_config())


def random_eps(seed=0, shape=(3, 2, 4, 4)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(3)]  # eps_cond, eps_uncond, x


def schedule():
    return minild.create("schedule", "linear", num_timesteps=100)


def guider(name, **params):
    return minild.create("guidance", name, **params).bind(schedule())


# ------------------------------------------------------------------- each method's equation


def test_the_four_built_in_methods_are_registered():
    assert set(METHODS) <= set(minild.available("guidance"))


def test_cfg_is_eps_u_plus_s_times_the_difference():
    eps_cond, eps_uncond, x = random_eps()
    t = torch.full((3,), 50)
    out = guider("cfg", scale=4.0)(eps_cond, eps_uncond, t=t, x=x)
    assert torch.equal(out, eps_uncond + 4.0 * (eps_cond - eps_uncond))


def test_cfg_interval_guides_only_for_sigma_in_its_interval():
    alphas_cumprod = schedule().alphas_cumprod
    sigma = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # σ_t = √((1 − ᾱ_t)/ᾱ_t)
    g = guider("cfg_interval", scale=3.0, sigma_low=0.3, sigma_high=0.9)
    for step in range(100):
        assert g.needs_uncond(step) == bool(0.3 < sigma[step] <= 0.9), step
    assert {g.needs_uncond(step) for step in range(100)} == {True, False}
    eps_cond, eps_uncond, x = random_eps()
    t = torch.tensor([5, 40, 99])  # one sample below, in and above the interval
    inside = (sigma[t] > 0.3) & (sigma[t] <= 0.9)
    assert inside.tolist() == [False, True, False]
    expected = torch.stack([
        eps_uncond[i] + 3.0 * (eps_cond[i] - eps_uncond[i]) if inside[i] else eps_cond[i] for i in range(3)
    ])
    torch.testing.assert_close(g(eps_cond, eps_uncond, t=t, x=x), expected, rtol=0, atol=0)


def test_cfg_rescale_mixes_the_std_rescaled_prediction_with_phi():
    eps_cond, eps_uncond, x = random_eps()
    scale, phi = 5.0, 0.7
    x_cfg = eps_uncond + scale * (eps_cond - eps_uncond)
    expected = []
    for b in range(3):  # per sample, std over all of C, H, W
        rescaled = x_cfg[b] * (eps_cond[b].std() / x_cfg[b].std())
        expected.append(phi * rescaled + (1 - phi) * x_cfg[b])
    out = guider("cfg_rescale", scale=scale, phi=phi)(eps_cond, eps_uncond, t=torch.full((3,), 10), x=x)
    torch.testing.assert_close(out, torch.stack(expected))


def apg_reference(steps, alphas_cumprod, scale, momentum, norm_threshold, eta):
    """Algorithm 1 of Sadat et al. on x̂0, one sample at a time, in float64."""
    outputs, running = [], None
    for eps_cond, eps_uncond, x, t in steps:
        abar = alphas_cumprod[t].double()
        to_x0 = lambda eps: (x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()  # noqa: E731
        d_cond, d_uncond = to_x0(eps_cond), to_x0(eps_uncond)
        diff = d_cond - d_uncond
        running = diff if running is None else diff + momentum * running
        diff = running
        out = []
        for b in range(len(x)):
            d = diff[b] * min(1.0, norm_threshold / float(diff[b].norm()))
            unit = d_cond[b] / d_cond[b].norm()
            parallel = (d * unit).sum() * unit
            guided = d_cond[b] + (scale - 1) * ((d - parallel) + eta * parallel)
            out.append((x[b].double() - abar.sqrt() * guided) / (1 - abar).sqrt())  # back to eps
        outputs.append(torch.stack(out))
    return outputs


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_apg_follows_algorithm_1_on_the_denoised_prediction_over_several_steps(eta):
    params = {"scale": 4.0, "momentum": -0.5, "norm_threshold": 3.0, "eta": eta}
    steps = []
    for i, t in enumerate([90, 60, 30, 5]):
        eps_cond, eps_uncond, x = random_eps(seed=i)
        steps.append((eps_cond, eps_uncond, x, t))
    g = guider("apg", **params)
    got = [g(c, u, t=torch.full((3,), t), x=x) for c, u, x, t in steps]
    expected = apg_reference(steps, schedule().alphas_cumprod, **params)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_apg_momentum_starts_afresh_with_every_bind():
    apg = minild.create("guidance", "apg", scale=4.0)
    steps = [(*random_eps(seed=i), t) for i, t in enumerate([80, 40])]
    first, second = apg.bind(schedule()), apg.bind(schedule())
    for c, u, x, t in steps:
        first(c, u, t=torch.full((3,), t), x=x)
    c, u, x, t = steps[0]
    fresh = apg.bind(schedule())(c, u, t=torch.full((3,), t), x=x)
    assert torch.equal(second(c, u, t=torch.full((3,), t), x=x), fresh)


def test_noise_levels_are_sigma_of_the_schedule():
    alphas_cumprod = schedule().alphas_cumprod
    torch.testing.assert_close(noise_levels(schedule()), torch.sqrt((1 - alphas_cumprod) / alphas_cumprod))


# ------------------------------------------------------------------------- in the pipeline


def old_guided_model_fn(model, cond, uncond, guidance_scale):
    """generate()'s guidance before guidance became a stage, verbatim."""
    if guidance_scale == 1.0:
        return lambda x, t: model(x, t, **cond)
    if guidance_scale == 0.0:
        return lambda x, t: model(x, t, **uncond)
    both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}

    def guided(x, t):
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return guided


# -1.0: a negative scale is taken, extrapolating away from the condition by the same formula.
@pytest.mark.parametrize("scale", [-1.0, 0.0, 1.0, 2.5, 7.5])
@pytest.mark.parametrize("how", ["guidance_scale", "guidance", "config"])
def test_cfg_is_bit_identical_to_the_old_guidance_scale_path(scale, how):
    config = class_config(guidance={"name": "cfg", "scale": scale}) if how == "config" else class_config()
    pipe = minild.Pipeline.from_config(config)
    kwargs = {"guidance_scale": scale} if how == "guidance_scale" else {}
    if how == "guidance":
        kwargs = {"guidance": {"name": "cfg", "scale": scale}}
    images = pipe.generate(class_labels=[0, 2, 1], num_inference_steps=STEPS, seed=3, **kwargs)
    labels = torch.tensor([0, 2, 1])
    model_fn = old_guided_model_fn(pipe.model, {"class_labels": labels}, {"class_labels": torch.full((3,), 3)}, scale)
    latents = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = pipe.sampler.sample(model_fn, (3, 1, 8, 8), num_inference_steps=STEPS, latents=latents)
    assert torch.equal(images, ((reference + 1) / 2).clamp(0, 1))


def batch_sizes(pipe):
    sizes = []
    handle = pipe.model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_a_config_without_guidance_runs_only_the_conditional_pass(pipe):
    sizes, handle = batch_sizes(pipe)
    try:
        pipe.generate(class_labels=[0, 1], num_inference_steps=STEPS, seed=0)
        pipe.generate(class_labels=[0, 1], guidance="apg", guidance_scale=1.0, num_inference_steps=STEPS, seed=0)
    finally:
        handle.remove()
    assert sizes == [2] * (2 * STEPS)


def test_cfg_interval_skips_the_unconditional_half_outside_its_interval(pipe):
    guidance = {"name": "cfg_interval", "scale": 3.0, "sigma_low": 0.3, "sigma_high": 2.0}
    sizes, handle = batch_sizes(pipe)
    try:
        pipe.generate(class_labels=[0, 1], guidance=guidance, num_inference_steps=10, seed=0)
    finally:
        handle.remove()
    sigma = noise_levels(pipe.schedule)
    expected = [4 if 0.3 < sigma[t] <= 2.0 else 2 for t in pipe.sampler.timesteps(10)]
    assert sizes == expected and set(expected) == {2, 4}
    assert sum(sizes) < 4 * 10  # fewer model evaluations than CFG at every step


def test_apg_state_is_reset_for_every_chunk_and_every_run(pipe):
    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (1, 2)]

    kwargs = {"guidance": {"name": "apg", "scale": 4.0, "momentum": -0.5}, "num_inference_steps": STEPS}
    chunked = pipe.generate(class_labels=[0, 2], generator=generators(), batch_size=1, **kwargs)
    second_alone = pipe.generate(class_labels=[2], generator=generators()[1:], **kwargs)
    assert torch.equal(chunked[1:], second_alone)
    assert torch.equal(pipe.generate(class_labels=[0, 2], generator=generators(), batch_size=1, **kwargs), chunked)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_samples_with_every_built_in_sampler(pipe, method, sampler):
    images = pipe.generate(class_labels=[0, 2], guidance=method, guidance_scale=3.0, sampler=sampler,
                           num_inference_steps=STEPS, seed=0)
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
    plain = pipe.generate(class_labels=[0, 2], guidance=method, guidance_scale=1.0, sampler=sampler,
                          num_inference_steps=STEPS, seed=0)
    assert not torch.equal(images, plain), "guidance changed nothing"


@pytest.fixture
def euler_sampler(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import minild_euler

    name = minild.register_plugin(minild_euler, name="euler_for_guidance")
    yield "euler_ancestral"
    minild.unregister_plugin(name)
    for module in [name for name in sys.modules if name.split(".")[0] == "minild_euler"]:
        del sys.modules[module]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_works_with_a_third_party_sampler(pipe, euler_sampler, method):
    images = pipe.generate(class_labels=[1, 2], guidance=method, guidance_scale=3.0, sampler=euler_sampler,
                           num_inference_steps=STEPS, seed=0)
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())


class CharacterEncoder:
    """A fixed random embedding per character: a text encoder for tests, no weights to load."""

    embedding_dim = 8

    def __init__(self, *, max_length: int = 6):
        self.max_length = max_length
        self.table = torch.randn(128, self.embedding_dim, generator=torch.Generator().manual_seed(0))

    def encode(self, prompts):
        codes = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            for column, char in enumerate(prompt[: self.max_length]):
                codes[row, column] = ord(char) % 128
        return self.table[codes]  # [B, L, D]


class CharacterEncoderPlugin:
    @hookimpl
    def register_text_encoders(self, register):
        register("test_characters", CharacterEncoder)


@pytest.fixture(scope="module")
def text_pipe():
    name = minild.register_plugin(CharacterEncoderPlugin(), name="test_characters")
    config = class_config(text_encoder={"name": "test_characters"})
    config["model"] = {**config["model"], "num_classes": None, "cross_attention_dim": 8, "cross_attention_heads": 2}
    yield minild.Pipeline.from_config(config)
    minild.unregister_plugin(name)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_samples_in_a_text_conditioned_pipeline(text_pipe, method, sampler):
    contexts = []
    handle = text_pipe.model.register_forward_hook(
        lambda module, args, kwargs, out: contexts.append(kwargs["context"]), with_kwargs=True
    )
    try:
        images = text_pipe.generate(prompts=["seven", "3"], guidance=method, guidance_scale=3.0, sampler=sampler,
                                    num_inference_steps=STEPS, seed=0)
    finally:
        handle.remove()
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
    empty = text_pipe.text_encoder.encode([""])[0]
    guided = [context for context in contexts if len(context) == 4]
    assert guided and all(torch.equal(context[2], empty) for context in guided)  # cond halves, then empty prompts


@pytest.mark.parametrize("method", METHODS)
def test_every_method_samples_in_a_latent_pipeline(method):
    config = class_config(
        vae={"name": "digits_vae", "latent_channels": 4, "base_channels": 8, "norm_groups": 4},
        image_shape=[4, 7, 7],
    )
    config["model"] = {**config["model"], "in_channels": 4}
    images = minild.Pipeline.from_config(config).generate(
        class_labels=[0, 1], guidance=method, guidance_scale=3.0, num_inference_steps=STEPS, seed=0
    )
    assert images.shape == (2, 1, 28, 28) and bool(torch.isfinite(images).all())


# ------------------------------------------------------------------------------ the config


def test_config_guidance_is_saved_and_reloaded(tmp_path):
    guidance = {"name": "apg", "scale": 4.0, "momentum": -0.25}
    pipe = minild.Pipeline.from_config(class_config(guidance=guidance))
    images = pipe.generate(class_labels=[0, 1], num_inference_steps=STEPS, seed=0)
    pipe.save_pretrained(tmp_path)
    again = minild.Pipeline.from_pretrained(tmp_path)
    assert again.config.guidance.to_dict() == guidance
    assert torch.equal(again.generate(class_labels=[0, 1], num_inference_steps=STEPS, seed=0), images)


def test_generate_overrides_the_configured_guidance_and_its_scale():
    configured = load_config(class_config(guidance={"name": "cfg_interval", "scale": 2.0, "sigma_low": 0.5}))
    assert guidance_spec(configured.guidance, None, None).to_dict() == {"name": "cfg_interval", "scale": 2.0,
                                                                         "sigma_low": 0.5}
    assert guidance_spec(configured.guidance, None, 4).to_dict()["scale"] == 4.0
    assert guidance_spec(configured.guidance, "apg", None).to_dict() == {"name": "apg"}
    assert guidance_spec(configured.guidance, {"name": "apg", "eta": 1.0}, 5.0).to_dict() == {
        "name": "apg", "eta": 1.0, "scale": 5.0}
    assert guidance_spec(None, None, None).to_dict() == {"name": "cfg", "scale": 1.0}


def test_bad_guidance_in_a_config_names_the_key():
    with pytest.raises(ConfigError, match=r"<dict>: guidance.name: unknown guidance 'apgg' \(did you mean 'apg'\?\)"):
        load_config(class_config(guidance={"name": "apgg"}))
    with pytest.raises(ConfigError, match=r"unknown key guidance.sigma_lo \(did you mean 'sigma_low'\?\)"):
        load_config(class_config(guidance={"name": "cfg_interval", "sigma_lo": 0.3}))
    with pytest.raises(ConfigError, match="guidance.scale must be float"):
        load_config(class_config(guidance={"name": "cfg", "scale": "3"}))
    with pytest.raises(ValueError, match="cfg_interval needs 0 <= sigma_low < sigma_high"):
        minild.Pipeline.from_config(class_config(guidance={"name": "cfg_interval", "sigma_low": 3, "sigma_high": 1}))


def test_a_sampler_configures_its_default_number_of_steps():
    steps = []
    pipe = minild.Pipeline.from_config(class_config(sampler={"name": "dpm_solver_pp", "num_inference_steps": 3}))
    pipe.generate(class_labels=[0], seed=0, callback=steps.append)
    assert len(steps) == 3
    steps.clear()
    minild.Pipeline.from_config(class_config(sampler={"name": "ddpm"})).generate(seed=0, callback=steps.append)
    assert len(steps) == 50  # no configured default: 50, as before
    with pytest.raises(ValueError, match="num_inference_steps must lie in"):
        minild.Pipeline.from_config(class_config(sampler={"name": "ddim", "num_inference_steps": 101}))


def test_a_one_pass_guidance_needs_no_unconditional_arguments():
    model = minild.create("model", "simple_unet", in_channels=1, base_channels=8, num_classes=3)
    model.eval()
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([5, 5]), torch.tensor([0, 2])
    eps = cfg_model_fn(model, {"class_labels": labels}, {}, 1.0)(x, t)  # scale 1: the conditional pass alone
    torch.testing.assert_close(eps, model(x, t, class_labels=labels))
