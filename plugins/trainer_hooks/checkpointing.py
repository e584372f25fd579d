"""The ``checkpoint`` trainer hook: atomic, complete checkpoints every N steps, epochs or minutes."""

from __future__ import annotations

import time
import warnings

from minild import hookimpl
from minild.training import checkpoint
from minild_plugins.trainer_hooks.common import check_counts, every


class Checkpointing:
    """Saves a checkpoint (``minild.training.checkpoint``) every ``every_steps`` steps, every
    ``every_epochs`` epochs, every ``every_minutes`` minutes of training (checked after each
    step, so a kill loses at most that much) and, with ``at_end``, when training stops; keeps
    the ``keep_last`` newest (all when null). Never writes NaN or inf weights: it stops the run
    instead, keeping the last good checkpoint."""

    writes_files = True

    def __init__(self, every_steps: int | None = None, every_epochs: int | None = 1,
                 every_minutes: float | None = None, keep_last: int | None = 3, at_end: bool = True):
        check_counts("checkpoint", every_steps=every_steps, every_epochs=every_epochs, keep_last=keep_last)
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"the 'checkpoint' trainer hook's every_minutes must be positive (or null: off), "
                             f"got {every_minutes}")
        self.every_steps, self.every_epochs, self.keep_last, self.at_end = every_steps, every_epochs, keep_last, at_end
        self.every_minutes = every_minutes

    @hookimpl
    def minild_train_start(self, trainer):
        if trainer.is_main_process:
            checkpoint.remove_leftovers(trainer.run_dir)
        self.saved = (trainer.step, trainer.epoch) if trainer.resumed_from is not None else None
        self.last_save = time.monotonic()

    @hookimpl(trylast=True)
    def minild_train_step_end(self, trainer, step):
        due = self.every_minutes is not None and time.monotonic() - self.last_save >= 60 * self.every_minutes
        if due or every(step, self.every_steps):
            self.save(trainer, stop_on_error=True)

    @hookimpl(trylast=True)
    def minild_train_epoch_end(self, trainer, epoch):
        if every(epoch, self.every_epochs):
            self.save(trainer, stop_on_error=True)

    @hookimpl(tryfirst=True)
    def minild_train_end(self, trainer):
        if self.at_end:
            self.save(trainer, stop_on_error=False)

    def save(self, trainer, *, stop_on_error: bool) -> None:
        if not trainer.is_main_process or self.saved == (trainer.step, trainer.epoch):
            return
        self.last_save = time.monotonic()
        try:
            path = trainer.save_checkpoint()
        except checkpoint.CheckpointError as err:
            newest = checkpoint.list_checkpoints(trainer.run_dir)
            message = f"{err}; the last good checkpoint is {newest[-1] if newest else 'none'}"
            if stop_on_error:
                trainer.request_stop(message)
            else:
                warnings.warn(message, stacklevel=2)
            return
        self.saved = (trainer.step, trainer.epoch)
        if self.keep_last is not None:
            checkpoint.prune_checkpoints(trainer.run_dir, self.keep_last, keep=path)
