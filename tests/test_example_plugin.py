"""The example plugin package examples/minild-euler, pip-installed for real: minild discovers
it through the entry-point group, a config uses its stages by name, and the package's own
tests (minild's conformance suite and a diffusers oracle) pass against the installed copy."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minild
from minild import plugins
from minild.cli import main
from tests.conftest import tiny_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minild-euler"


@pytest.fixture(scope="session")
def example_install(tmp_path_factory) -> tuple[Path, Path]:
    """``pip install --target`` of a copy of the example (the build leaves the checkout clean).

    Returns the source copy and the directory it was installed into.
    """
    root = tmp_path_factory.mktemp("minild_euler")
    source, target = root / "src", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return source, target


@pytest.fixture
def installed_euler(example_install, monkeypatch):
    _, target = example_install
    monkeypatch.syspath_prepend(str(target))
    plugins.reset_plugin_manager()
    yield target
    monkeypatch.undo()
    for module in [name for name in sys.modules if name.split(".")[0] == "minild_euler"]:
        del sys.modules[module]
    plugins.reset_plugin_manager()


def test_installed_package_registers_its_stages_through_the_entry_point(installed_euler):
    for kind, name in (("sampler", "euler_ancestral"), ("model", "tiny_eps")):
        entry = plugins.registry(kind)[name]
        assert entry.plugin == "euler" and entry.package == "minild-euler 0.1.0"
        assert Path(sys.modules[entry.factory.__module__].__file__).is_relative_to(installed_euler)


def test_cli_lists_the_installed_plugin(installed_euler, capsys):
    assert main(["plugins"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["sampler", "euler_ancestral", "euler", "minild-euler", "0.1.0"] in rows
    assert ["model", "tiny_eps", "euler", "minild-euler", "0.1.0"] in rows


def test_config_names_the_plugin_stages_and_the_pipeline_round_trips(installed_euler, tmp_path):
    config = tiny_config(
        model={"name": "tiny_eps", "in_channels": 1, "channels": 8, "embedding_dim": 16, "num_classes": 10},
        sampler={"name": "euler_ancestral", "eta": 1.0},
    )
    config["model"] = {k: v for k, v in config["model"].items() if k not in ("base_channels", "time_embedding_dim")}
    pipe = minild.Pipeline.from_config(config)
    pipe.train(max_steps=2)
    images = pipe.generate(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=6, seed=0)
    assert images.shape == (2, 1, 28, 28)
    pipe.save_pretrained(tmp_path)
    reloaded = minild.Pipeline.from_pretrained(tmp_path)
    assert type(reloaded.model).__name__ == "TinyEpsModel"
    assert torch.equal(reloaded.generate(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=6, seed=0), images)


def test_without_the_install_the_names_are_unknown():
    try:
        importlib.metadata.distribution("minild-euler")
        pytest.skip("minild-euler is installed in this environment")
    except importlib.metadata.PackageNotFoundError:
        pass
    plugins.reset_plugin_manager()
    with pytest.raises(minild.PluginError, match="unknown sampler 'euler_ancestral'; available: ddim, ddpm"):
        minild.create("sampler", "euler_ancestral", None)


def test_example_package_passes_its_own_tests_against_the_installed_copy(example_install):
    source, target = example_install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         str(source / "tests")],
        cwd=source, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_installed_euler_ancestral_drives_the_sdxl_pipeline_like_diffusers(installed_euler, tiny_sdxl_dir, one_thread):
    """A third-party sampler reaches the prompt lab with no change to minild: its step-wise interface
    and its ``state_scale`` (σ-space state) give diffusers' EulerAncestralDiscreteScheduler's images."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from minild.lab.scheduler_adapter import make_scheduler, scheduler_names

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config

    def images(scheduler):
        pipe.scheduler = scheduler
        generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
        return pipe(["a red cube", "a blue ball"], num_inference_steps=3, guidance_scale=5.0,
                    generator=generators, output_type="pt").images

    assert "minild:euler_ancestral" in scheduler_names()
    ours = make_scheduler("minild:euler_ancestral", config)
    theirs = EulerAncestralDiscreteScheduler.from_config(config)
    ours.set_timesteps(3)
    theirs.set_timesteps(3)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), theirs.timesteps[:2].long()
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    reference = images(EulerAncestralDiscreteScheduler.from_config(config))
    assert (images(make_scheduler("minild:euler_ancestral", config)) - reference).abs().max() <= 1e-4
    plain = images(make_scheduler("minild:euler_ancestral:eta=0", config))
    assert (plain - reference).abs().max() > 1e-3  # eta=0 from the name: no ancestral noise
