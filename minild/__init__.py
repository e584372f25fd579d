"""minild: a plugin-based mini latent-diffusion pipeline."""

from typing import TYPE_CHECKING

from minild.errors import UnavailableError
from minild.hookspecs import hookimpl
from minild.plugins import PluginError, available, create, register_plugin, unregister_plugin
from minild.schedule import NoiseSchedule

if TYPE_CHECKING:  # for type checkers and the API reference; at run time it is imported lazily, below
    from minild.pipeline import Pipeline

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "Pipeline",
    "PluginError",
    "UnavailableError",
    "available",
    "create",
    "hookimpl",
    "register_plugin",
    "unregister_plugin",
]


def __getattr__(name):
    # The pipeline pulls in torchvision and friends; import it only when asked for.
    if name == "Pipeline":
        from minild.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'minild' has no attribute {name!r}")
