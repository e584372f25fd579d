"""The plugin host: registries, errors, entry-point discovery and the `minild plugins` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def write_dist_info(site: Path, name: str, version: str, entry_points: str) -> None:
    """What pip leaves in ``site`` for distribution ``name``: METADATA and ``[minild]`` entry points."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[minild]\n{entry_points}")


@pytest.fixture
def external_plugin(tmp_path, monkeypatch):
    """An installed-looking package (dist-info with an entry point) on sys.path."""
    package = tmp_path / "minild_one_step"
    package.mkdir()
    (package / "__init__.py").write_text(EXTERNAL_PLUGIN)
    write_dist_info(tmp_path, "minild-one-step", "0.3", "one_step = minild_one_step\n")
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
    assert minild.available("sampler") == ["ddim", "ddpm", "distilled", "dpm_solver_pp"]  # the built-ins only
    monkeypatch.setenv("MINILD_PLUGINS", "one_step")
    plugins.reset_plugin_manager()
    assert "one_step" in minild.available("sampler")


def test_plugin_that_fails_to_import_is_reported_and_skipped(external_plugin):
    write_dist_info(external_plugin, "minild-broken", "1.0", "broken = minild_broken_module_that_does_not_exist\n")
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


@pytest.fixture
def plugin_raising_on_import(external_plugin):
    """Beside the working one_step plugin, an installed plugin whose import raises."""
    (external_plugin / "minild_boom.py").write_text('raise RuntimeError("minild_boom needs libfoo 2.0")\n')
    write_dist_info(external_plugin, "minild-boom", "1.0", "boom = minild_boom\n")
    plugins.reset_plugin_manager()
    yield external_plugin
    sys.modules.pop("minild_boom", None)


def test_plugin_raising_on_import_is_listed_as_broken_and_the_cli_still_works(plugin_raising_on_import):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_raising_on_import), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "minild.cli", "plugins"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "broken plugin boom: minild-boom 1.0: RuntimeError: minild_boom needs libfoo 2.0" in listing.stdout
    rows = [line.split() for line in listing.stdout.splitlines()]
    assert ["sampler", "one_step", "one_step", "minild-one-step", "0.3"] in rows
    assert any(row[:2] == ["model", "simple_unet"] for row in rows)


def test_allow_list_keeps_an_unlisted_broken_plugin_from_being_imported(plugin_raising_on_import, monkeypatch):
    monkeypatch.setenv("MINILD_PLUGINS", "one_step")
    plugins.reset_plugin_manager()
    assert "one_step" in minild.available("sampler")
    assert "minild_boom" not in sys.modules and "boom" not in plugins.broken_plugins


def test_duplicate_name_from_an_installed_plugin_names_both_and_the_allow_list_fixes_it(external_plugin, monkeypatch):
    (external_plugin / "minild_dupe.py").write_text(
        "from minild import hookimpl\n\n@hookimpl\ndef register_samplers(register):\n    register('one_step', object)\n"
    )
    write_dist_info(external_plugin, "minild-dupe", "2.0", "dupe = minild_dupe\n")
    plugins.reset_plugin_manager()
    try:
        with pytest.raises(minild.PluginError, match=r"sampler 'one_step' is registered twice: by plugin '(one_step|dupe)' "
                           r"and by plugin '(one_step|dupe)'; uninstall one of them or limit plugins with MINILD_PLUGINS"):
            minild.available("sampler")
        monkeypatch.setenv("MINILD_PLUGINS", "one_step")
        plugins.reset_plugin_manager()
        assert plugins.registry("sampler")["one_step"].plugin == "one_step"
    finally:
        sys.modules.pop("minild_dupe", None)


def test_a_shadowed_older_installation_of_a_plugin_package_is_ignored(external_plugin, tmp_path_factory, monkeypatch):
    stale = tmp_path_factory.mktemp("stale-site-packages")
    write_dist_info(stale, "minild-one-step", "0.2", "one_step = minild_one_step\nold_extra = minild_gone\n")
    monkeypatch.syspath_prepend(str(stale))
    monkeypatch.syspath_prepend(str(external_plugin))  # the current installation comes first, as pip leaves it
    plugins.reset_plugin_manager()
    assert plugins.registry("sampler")["one_step"].package == "minild-one-step 0.3"
    assert "old_extra" not in plugins.broken_plugins


def test_two_packages_with_the_same_entry_point_name_report_the_second_as_broken(external_plugin):
    (external_plugin / "minild_other.py").write_text("")
    write_dist_info(external_plugin, "minild-other", "1.0", "one_step = minild_other\n")
    plugins.reset_plugin_manager()
    with pytest.warns(UserWarning, match="entry-point name 'one_step' is already taken by minild-"):
        minild.available("sampler")
    packages = {"minild-one-step 0.3", "minild-other 1.0"}
    loaded = plugins._packages["one_step"]  # whichever of the two sys.path lists first
    [(name, reason)] = [(n, r) for n, r in plugins.broken_plugins.items() if n.startswith("one_step (")]
    [skipped] = packages - {loaded}
    assert name == f"one_step ({skipped})"
    assert reason == f"{skipped}: its entry-point name 'one_step' is already taken by {loaded}"
