"""The ``tensorboard`` trainer hook: loss, LR, img/s and fixed-seed samples as TensorBoard events
in ``run_dir/tensorboard`` (needs the optional ``tensorboard`` package)."""

from __future__ import annotations

from pathlib import Path

from minild import hookimpl
from minild.errors import UnavailableError
from minild_plugins.trainer_hooks.common import Rate, check_counts, every
from minild_plugins.trainer_hooks.samples import FixedSeedSamples

LOG_DIR = "tensorboard"


class TensorBoardUnavailableError(UnavailableError):
    """The ``tensorboard`` package, which the hook writes its event files with, is not installed."""


class TensorBoard:
    """Writes ``train/loss``, ``train/lr`` and ``train/images_per_second`` every ``every_steps``
    steps, ``train/epoch_mean_loss`` every epoch, and ``samples`` (``num_images`` at a fixed
    ``seed``, as the ``sample_grid`` hook draws them) every ``sample_every_steps`` steps and/or
    ``sample_every_epochs`` epochs, with ``torch.utils.tensorboard.SummaryWriter`` into
    ``run_dir/tensorboard``. A resumed run purges the events after its checkpoint's step.
    View with ``tensorboard --logdir RUN_DIR/tensorboard``."""

    writes_files = True

    def __init__(self, every_steps: int = 10, sample_every_steps: int | None = None,
                 sample_every_epochs: int | None = 5, num_images: int = 20, seed: int = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None):
        check_counts("tensorboard", every_steps=every_steps, sample_every_steps=sample_every_steps,
                     sample_every_epochs=sample_every_epochs, num_images=num_images,
                     num_inference_steps=num_inference_steps)
        self.every_steps = every_steps
        self.sample_every_steps, self.sample_every_epochs = sample_every_steps, sample_every_epochs
        self.samples = FixedSeedSamples(num_images, seed, num_inference_steps, guidance_scale)
        self.writer = None

    @hookimpl
    def minild_train_start(self, trainer):
        summary_writer = _summary_writer_class()  # on every process: all refuse alike
        if not trainer.is_main_process:
            return
        # purge_step drops events a killed run wrote after the checkpoint this run resumes from.
        purge_step = trainer.step + 1 if trainer.resumed_from is not None else None
        self.writer = summary_writer(log_dir=str(Path(trainer.run_dir) / LOG_DIR), purge_step=purge_step)
        self.rate = Rate(trainer.step)
        self.last_sampled = None

    @hookimpl
    def minild_train_step_end(self, trainer, step, loss, lr, batch_size):
        if self.writer is None:
            return
        if every(step, self.every_steps):
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/images_per_second", self.rate.update(step, batch_size), step)
        if every(step, self.sample_every_steps):
            self._add_samples(trainer)

    @hookimpl
    def minild_train_epoch_end(self, trainer, epoch, mean_loss):
        if self.writer is None:
            return
        self.writer.add_scalar("train/epoch_mean_loss", mean_loss, trainer.step)
        if every(epoch, self.sample_every_epochs):
            self._add_samples(trainer)

    @hookimpl
    def minild_checkpoint_saved(self):
        if self.writer is not None:
            self.writer.flush()

    @hookimpl
    def minild_train_end(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _add_samples(self, trainer) -> None:
        if self.last_sampled == trainer.step:
            return
        self.writer.add_images("samples", self.samples(trainer), trainer.step, dataformats="NCHW")
        self.last_sampled = trainer.step


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise TensorBoardUnavailableError(
            f"the 'tensorboard' trainer hook needs the tensorboard package ({err}): "
            'pip install "minild[tensorboard]", or remove the hook from train.hooks'
        ) from None
    return SummaryWriter
