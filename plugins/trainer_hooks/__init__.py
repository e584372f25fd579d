"""Built-in trainer hooks, each switched on by name in ``train.hooks``: ``progress`` (tqdm),
``metrics_log`` (JSONL/CSV), ``loss_plot`` (PNG), ``sample_grid`` (PNG), ``ema``,
``checkpoint``, ``tensorboard`` (event files; optional package).
"""

from __future__ import annotations

from minild import hookimpl
from minild_plugins.trainer_hooks.checkpointing import Checkpointing
from minild_plugins.trainer_hooks.ema import EMA
from minild_plugins.trainer_hooks.metrics import LossPlot, MetricsLog, plot_losses
from minild_plugins.trainer_hooks.progress import ProgressBar
from minild_plugins.trainer_hooks.samples import SampleGrid
from minild_plugins.trainer_hooks.tensorboard import TensorBoard

__all__ = ["Checkpointing", "EMA", "LossPlot", "MetricsLog", "ProgressBar", "SampleGrid", "TensorBoard", "plot_losses"]


@hookimpl
def register_trainer_hooks(register):
    register("progress", ProgressBar)
    register("metrics_log", MetricsLog)
    register("loss_plot", LossPlot)
    register("sample_grid", SampleGrid)
    register("ema", EMA)
    register("checkpoint", Checkpointing)
    register("tensorboard", TensorBoard)
