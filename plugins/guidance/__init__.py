"""Built-in guidance methods: classifier-free guidance (cfg), CFG in a limited noise interval
(cfg_interval), CFG with its std rescaled (cfg_rescale) and adaptive projected guidance (apg)."""

from minild import hookimpl

from .apg import AdaptiveProjectedGuidance
from .cfg import ClassifierFreeGuidance
from .cfg_interval import IntervalGuidance
from .cfg_rescale import RescaledGuidance

__all__ = ["AdaptiveProjectedGuidance", "ClassifierFreeGuidance", "IntervalGuidance", "RescaledGuidance"]


@hookimpl
def register_guidances(register):
    register("cfg", ClassifierFreeGuidance)
    register("cfg_interval", IntervalGuidance)
    register("cfg_rescale", RescaledGuidance)
    register("apg", AdaptiveProjectedGuidance)
