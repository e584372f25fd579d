"""The minimal sampler, model and guidance printed in docs/plugins.md work: they pass the conformance
suite after in-process registration, as the guide says they would after `pip install`."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import minild
from minild.testing import GuidanceConformance, ModelConformance, SamplerConformance

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def guide_module(first_line: str) -> types.ModuleType:
    """The ```python block of the guide that starts with ``first_line``, run as a module."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    (source,) = [block for block in blocks if block.startswith(first_line)]
    module = types.ModuleType(first_line.removeprefix("# ").split("/")[0])
    exec(compile(source, f"{GUIDE}:{first_line}", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module", autouse=True)
def guide_plugins():
    names = [minild.register_plugin(guide_module(f"# {name}/__init__.py")) for name in ("my_sampler", "my_model", "my_guidance")]
    yield
    for name in names:
        minild.unregister_plugin(name)


class TestGuideSampler(SamplerConformance):
    name = "deterministic_ddim"
    params = {"clip": True}
    schedule = ("cosine", {"num_timesteps": 100})


class TestGuideModel(ModelConformance):
    name = "small_eps"
    params = {"channels": 8}


class TestGuideGuidance(GuidanceConformance):
    name = "linear_ramp"


def test_guide_config_uses_its_stages_by_name():
    config = {
        "schedule": {"name": "linear", "num_timesteps": 100},
        "model": {"name": "small_eps", "channels": 8, "num_classes": 10},
        "sampler": {"name": "deterministic_ddim"},
        "guidance": {"name": "linear_ramp", "scale": 4.0},
        "image_shape": [1, 8, 8],
        "train": {"hooks": []},
    }
    images = minild.Pipeline.from_config(config).generate(class_labels=[3], guidance_scale=2.0, num_inference_steps=4)
    assert images.shape == (1, 1, 8, 8)
