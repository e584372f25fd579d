"""Built-in eps-models, one module per seed architecture; shared pieces in ``blocks``."""

from minild import hookimpl
from minild_plugins.unets.block_unet import BlockUNet
from minild_plugins.unets.dummy import DummyEpsModel
from minild_plugins.unets.film_unet import FiLMUNet
from minild_plugins.unets.guided_student import GuidedStudent
from minild_plugins.unets.naive_unet import NaiveUnet
from minild_plugins.unets.simple_unet import SimpleUNet

__all__ = ["BlockUNet", "DummyEpsModel", "FiLMUNet", "GuidedStudent", "NaiveUnet", "SimpleUNet"]


@hookimpl
def register_models(register):
    register("simple_unet", SimpleUNet)  # Lab 2.6.1 (seed 001)
    register("film_unet", FiLMUNet)  # Module 16 (seeds 000 and 003)
    register("block_unet", BlockUNet)  # doc 32 (seed 002)
    register("naive_unet", NaiveUnet)  # minDiffusion (seed 004)
    register("dummy_eps", DummyEpsModel)  # minDiffusion's time-blind baseline (seed 004)
    register("guided_student", GuidedStudent)  # a distilled student: the teacher plus a guidance-scale input
