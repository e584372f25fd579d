"""The plugin host: registries, errors, entry-point discovery and the `minild plugins` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import minild
from minild import plugins


def test_builtin_stages_are_available():
    assert {"linear", "cosine"} <= set(minild.available("schedule"))
    assert {"simple_unet", "film_unet", "block_unet", "naive_unet", "dummy_eps"} <= set(minild.available("model"))
    assert {"ddpm", "ddim"} <= set(minild.available("sampler"))
    assert {"progress", "ema"} <= set(minild.available("hooks"))


def test_builtins_come_from_the_minild_entry_point_group():
    entry = plugins.registry("sampler")["ddim"]
    assert entry.plugin == "samplers"
    assert entry.package.startswith("minild ")


def test_unknown_name_lists_available_names():
    with pytest.raises(minild.PluginError, match=r"unknown sampler 'nope'; available: .*ddim.*ddpm"):
        minild.create("sampler", "nope", None)


def test_unknown_kind_lists_kinds():
    with pytest.raises(minild.PluginError, match="the kinds are: schedule, model, sampler"):
        minild.available("scheduler")


def test_create_builds_a_stage_with_params():
    schedule = minild.create("schedule", "linear", num_timesteps=10)
    assert schedule.num_timesteps == 10


def test_duplicate_name_is_an_error_naming_both_plugins():
    class Duplicate:
        @minild.hookimpl
        def register_samplers(self, register):
            register("ddim", object)

    name = minild.register_plugin(Duplicate(), name="duplicate-ddim")
    try:
        with pytest.raises(minild.PluginError, match=r"sampler 'ddim' is registered twice: by plugin '.+' and by plugin '.+'"):
            minild.available("sampler")
    finally:
        minild.unregister_plugin(name)
    assert "ddim" in minild.available("sampler")


def test_runtime_plugin_may_accept_fewer_hook_arguments():
    class Steps:
        @minild.hookimpl
        def minild_train_step_end(self, step):
            self.last = step

    hook = Steps()
    name = minild.register_plugin(hook, name="steps-counter")
    try:
        plugins.get_plugin_manager().hook.minild_train_step_end(trainer=None, step=7, loss=0.5, lr=1e-3, batch_size=4)
    finally:
        minild.unregister_plugin(name)
    assert hook.last == 7


EXTERNAL_PLUGIN = '''
"""A third-party sampler: one-step x0 prediction from the last timestep."""
import torch
from minild import hookimpl


class OneStepSampler:
    def __init__(self, schedule, *, clip: bool = True):
        self.schedule, self.clip = schedule, clip

    @torch.no_grad()
    def sample(self, model_fn, shape, *, num_inference_steps=None, generator=None, latents=None, callback=None):
        x = torch.randn(shape, generator=generator) if latents is None else latents
        t = self.schedule.num_timesteps - 1
        alpha_bar = self.schedule.alphas_cumprod[t]
        eps = model_fn(x, torch.full((shape[0],), t, dtype=torch.long))
        x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        return x0.clamp(-1, 1) if self.clip else x0


@hookimpl
def register_samplers(register):
    register("one_step", OneStepSampler)
'''


@pytest.fixture
def external_plugin(tmp_path, monkeypatch):
    """An installed-looking package (dist-info with an entry point) on sys.path."""
    package = tmp_path / "minild_one_step"
    package.mkdir()
    (package / "__init__.py").write_text(EXTERNAL_PLUGIN)
    dist_info = tmp_path / "minild_one_step-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: minild-one-step\nVersion: 0.3\n")
    (dist_info / "entry_points.txt").write_text("[minild]\none_step = minild_one_step\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset_plugin_manager()
    yield tmp_path
    monkeypatch.undo()
    sys.modules.pop("minild_one_step", None)
    plugins.reset_plugin_manager()


def test_entry_point_plugin_is_discovered_and_usable_from_a_config(external_plugin):
    from tests.conftest import tiny_config

    entry = plugins.registry("sampler")["one_step"]
    assert entry.plugin == "one_step" and entry.package == "minild-one-step 0.3"
    config = tiny_config()
    config["sampler"] = {"name": "one_step", "clip": False}
    pipe = minild.Pipeline.from_config(config)
    images = pipe.generate(2, seed=0)
    assert images.shape == (2, 1, 28, 28)


def test_allow_list_env_var_limits_third_party_plugins(external_plugin, monkeypatch):
    monkeypatch.setenv("MINILD_PLUGINS", "")
    plugins.reset_plugin_manager()
    assert minild.available("sampler") == ["ddim", "ddpm", "dpm_solver_pp"]  # the built-ins only
    monkeypatch.setenv("MINILD_PLUGINS", "one_step")
    plugins.reset_plugin_manager()
    assert "one_step" in minild.available("sampler")


def test_plugin_that_fails_to_import_is_reported_and_skipped(external_plugin):
    dist_info = external_plugin / "minild_broken-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: minild-broken\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[minild]\nbroken = minild_broken_module_that_does_not_exist\n")
    plugins.reset_plugin_manager()
    with pytest.warns(UserWarning, match="minild plugin 'broken' .* failed to load"):
        samplers = minild.available("sampler")
    assert {"ddim", "one_step"} <= set(samplers)
    assert "ModuleNotFoundError" in plugins.broken_plugins["broken"]


def test_cli_plugins_lists_kind_name_plugin_and_package(external_plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(external_plugin), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "minild.cli", "plugins"], capture_output=True, text=True, env=env, check=True
    ).stdout
    lines = [line.split() for line in out.splitlines()]
    assert ["sampler", "one_step", "one_step", "minild-one-step", "0.3"] in lines
    assert any(row[:3] == ["model", "simple_unet", "unets"] for row in lines)
    assert any(row[:2] == ["schedule", "cosine"] for row in lines)
