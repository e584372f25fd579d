"""minild-euler: an example third-party minild plugin.

It registers one sampler (``euler_ancestral``) and one eps-model (``tiny_eps``) through the
``minild`` entry-point group declared in this package's pyproject.toml.
"""

from minild import hookimpl

from minild_euler.model import TinyEpsModel
from minild_euler.sampler import EulerAncestralSampler

__all__ = ["EulerAncestralSampler", "TinyEpsModel"]


@hookimpl
def register_samplers(register):
    register("euler_ancestral", EulerAncestralSampler)


@hookimpl
def register_models(register):
    register("tiny_eps", TinyEpsModel)
