"""Property-based tests (hypothesis): the config loader on generated configs, and the
invariants of every schedule and of DDIM that no single example pins down."""

from __future__ import annotations

import inspect
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import minild
from minild import plugins
from minild.config import ConfigError, DataConfig, PipelineConfig, TrainConfig, load_config

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the config loader --------------------------------------------------------------------

hooks = st.lists(
    st.sampled_from(["progress", "metrics_log"])
    | st.builds(lambda decay: {"name": "ema", "decay": decay}, st.floats(0.5, 0.9999))
    | st.builds(lambda every, keep: {"name": "checkpoint", "every_steps": every, "keep_last": keep},
                st.integers(1, 1000), st.integers(1, 10)),
    max_size=3,
)
valid_configs = st.fixed_dictionaries(
    {
        "schedule": st.one_of(
            st.builds(lambda t: {"name": "linear", "num_timesteps": t}, st.integers(1, 4000)),
            st.builds(lambda t, s: {"name": "cosine", "num_timesteps": t, "s": s}, st.integers(1, 4000),
                      st.floats(0, 0.1)),
        ),
        "model": st.builds(
            lambda name, channels, classes: {"name": name, "in_channels": channels, "num_classes": classes},
            st.sampled_from(["simple_unet", "film_unet", "block_unet", "naive_unet"]),
            st.integers(1, 4), st.none() | st.integers(1, 100),
        ),
        "sampler": st.one_of(
            st.builds(lambda eta: {"name": "ddim", "eta": eta}, st.floats(0, 1)),
            st.builds(lambda clip: {"name": "ddpm", "clip_sample": clip}, st.sampled_from(["none", "clip"])),
        ),
    },
    optional={
        "data": st.fixed_dictionaries({}, optional={
            "dataset": st.sampled_from(["digits", "mnist", "cifar10"]),
            "image_size": st.none() | st.integers(1, 256),
            "channels": st.none() | st.sampled_from([1, 3]),
            "split": st.sampled_from(["train", "test"]),
        }),
        "train": st.fixed_dictionaries({}, optional={
            "batch_size": st.integers(1, 1024),
            "lr": st.floats(1e-8, 1.0),
            "lr_schedule": st.sampled_from(["constant", "cosine", "linear"]),
            "warmup_steps": st.integers(0, 10_000),
            "grad_clip": st.none() | st.floats(0.01, 100),
            "max_steps": st.none() | st.integers(1, 10**6),
            "max_minutes": st.none() | st.floats(0.01, 1000),
            "precision": st.sampled_from(["fp32", "bf16"]),
            "hooks": hooks,
        }),
        "seed": st.integers(0, 2**31 - 1),
    },
)


@PROPERTY
@given(valid_configs)
def test_valid_config_loads_and_round_trips_through_its_yaml_file(raw):
    config = load_config(raw)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        config.dump(path)
        assert load_config(path) == config
    assert load_config(config.to_dict()) == config


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**4) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def stage_like(names, params):
    """Mostly ``{name: a real or wrong name, some params: any value}``, sometimes anything at all."""
    named = st.fixed_dictionaries({"name": st.sampled_from([*names, "nope"])},
                                  optional={key: json_values for key in params})
    return st.one_of(named, named, named, json_values)


def section_like(keys):
    return st.one_of(st.fixed_dictionaries({}, optional={key: json_values for key in keys}), json_values)


fuzzed_configs = st.fixed_dictionaries(
    {
        "schedule": stage_like(["linear", "cosine"], ["num_timesteps", "beta_start", "s", "dtype"]),
        "model": stage_like(["simple_unet", "dummy_eps"], ["in_channels", "base_channels", "channel_mults", "attention"]),
        "sampler": stage_like(["ddim", "ddpm"], ["eta", "clip_sample", "variance_type"]),
    },
    optional={
        "data": section_like(["dataset", "image_size", "channels", "prompt_templates"]),
        "train": section_like(["batch_size", "lr", "lr_schedule", "grad_clip", "hooks", "max_minutes"]),
        "image_shape": json_values,
        "seed": json_values,
        "vae": json_values,
        "extra": json_values,
    },
)


@PROPERTY
@given(fuzzed_configs)
def test_any_mapping_either_loads_or_raises_a_config_error(raw):
    try:
        config = load_config(raw)
    except ConfigError as err:
        assert str(err).startswith("<dict>: ")
    else:
        assert isinstance(config, PipelineConfig)


@PROPERTY
@given(valid_configs, st.sampled_from(["", "train", "data", "model", "schedule"]), st.text(min_size=1, max_size=12))
def test_an_unknown_key_in_any_section_is_named(raw, section, key):
    known = {"": PipelineConfig.__dataclass_fields__, "train": TrainConfig.__dataclass_fields__,
             "data": DataConfig.__dataclass_fields__}
    if section in ("model", "schedule"):
        known[section] = inspect.signature(plugins.lookup(section, raw[section]["name"]).factory).parameters
    assume(key not in known[section] and key != "name")
    raw = {**raw, **({section: {**raw.get(section, {}), key: 1}} if section else {key: 1})}
    prefix = f"{section}." if section else ""
    with pytest.raises(ConfigError, match=rf"unknown key {re.escape(prefix + key)}"):
        load_config(raw)


int_train_keys = st.sampled_from(["batch_size", "grad_accumulation_steps", "warmup_steps", "seed"])
not_an_int = st.text(max_size=4) | st.floats(allow_nan=False) | st.booleans() | st.lists(st.integers(), max_size=2)


@PROPERTY
@given(valid_configs, int_train_keys, not_an_int)
def test_a_non_integer_where_an_integer_belongs_is_named_with_its_type(raw, key, value):
    raw = {**raw, "train": {**raw.get("train", {}), key: value}}
    with pytest.raises(ConfigError, match=rf"train.{key} must be int, got"):
        load_config(raw)


# -- schedules ----------------------------------------------------------------------------

linear_params = st.fixed_dictionaries({
    "num_timesteps": st.integers(1, 2000),
    "beta_start": st.floats(1e-5, 0.02),
}).flatmap(lambda p: st.builds(lambda end: {**p, "beta_end": end}, st.floats(p["beta_start"], 0.05)))
cosine_params = st.fixed_dictionaries({
    "num_timesteps": st.integers(1, 2000),
    "s": st.floats(0.0, 0.1),
    "dtype": st.sampled_from(["float32", "float64"]),
})
schedules = st.one_of(
    st.builds(lambda p: ("linear", p), linear_params),
    st.builds(lambda p: ("cosine", p), cosine_params),
    st.builds(lambda t: ("cosine", {"num_timesteps": t, "min_beta": 0.0, "max_beta": 0.999, "dtype": "float64"}),
              st.integers(1, 2000)),
)


def assert_schedule_invariants(schedule):
    alphas_cumprod = schedule.alphas_cumprod
    assert bool((alphas_cumprod > 0).all() and (alphas_cumprod <= 1).all())
    assert bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all())  # strictly decreasing
    assert bool((schedule.posterior_variance >= 0).all())
    assert bool((schedule.posterior_variance <= schedule.betas * (1 + 1e-5)).all())  # β̃_t ≤ β_t


@PROPERTY
@given(schedules)
def test_alphas_cumprod_lies_in_0_1_and_strictly_decreases(named):
    name, params = named
    assert_schedule_invariants(minild.create("schedule", name, **params))


@PROPERTY
@given(st.integers(1, 5000), st.floats(1e-4, 0.9), st.floats(0.0, 0.999))
def test_any_linear_schedule_is_refused_or_keeps_the_invariants(num_timesteps, beta_start, extra):
    beta_end = beta_start + extra * (0.999 - beta_start)
    try:
        schedule = minild.create("schedule", "linear", num_timesteps=num_timesteps, beta_start=beta_start,
                                 beta_end=beta_end)
    except ValueError as err:
        assert "beta" in str(err)
    else:
        assert_schedule_invariants(schedule)


@PROPERTY
@given(schedules, st.integers(0, 2**31 - 1))
def test_add_noise_preserves_unit_variance_and_scales_a_constant_image(named, seed):
    name, params = named
    schedule = minild.create("schedule", name, **params)
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, schedule.num_timesteps, (4,), generator=generator)
    alphas_cumprod = schedule.alphas_cumprod[t]  # [4]
    # Exactly: the signal and noise coefficients are √ᾱ_t and √(1 − ᾱ_t).
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    signal, noise_scale = schedule.add_noise(ones, zeros, t), schedule.add_noise(zeros, ones, t)
    torch.testing.assert_close(signal[:, 0], alphas_cumprod.sqrt())
    torch.testing.assert_close(signal[:, 0] ** 2 + noise_scale[:, 0] ** 2, torch.ones(4))
    # In distribution: x0 ~ N(0, 1) stays N(0, 1); a constant c becomes N(√ᾱ_t c, 1 − ᾱ_t).
    x0 = torch.randn(4, 20_000, generator=generator)
    noise = torch.randn(4, 20_000, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t.var(dim=1), torch.ones(4), atol=0.06, rtol=0)
    constant = schedule.add_noise(torch.full((4, 20_000), 0.7), noise, t)
    torch.testing.assert_close(constant.mean(dim=1), 0.7 * alphas_cumprod.sqrt(), atol=0.03, rtol=0)
    torch.testing.assert_close(constant.var(dim=1), 1 - alphas_cumprod, atol=0.06, rtol=0)


# -- DDIM ---------------------------------------------------------------------------------


def toy_eps(x, t):
    return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)  # deterministic in (x, t)


@PROPERTY
@given(schedules, st.integers(0, 2**31 - 1), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_ddim_eta0_depends_only_on_the_latents(named, latent_seed, steps, generator_seed):
    name, params = named
    schedule = minild.create("schedule", name, **params)
    sampler = minild.create("sampler", "ddim", schedule, eta=0.0)
    shape = (2, 1, 4, 4)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(latent_seed))
    steps = min(steps, schedule.num_timesteps)
    first = sampler.sample(toy_eps, shape, num_inference_steps=steps, latents=latents,
                           generator=torch.Generator().manual_seed(generator_seed))
    again = sampler.sample(toy_eps, shape, num_inference_steps=steps, latents=latents.clone(), generator=None)
    assert torch.equal(first, again)
    assert bool(first.isfinite().all())
