"""The ``progress`` trainer hook: a tqdm bar with loss, img/s and the ETA or the time budget left."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from minild import hookimpl


class ProgressBar:
    """tqdm bar over optimizer steps showing loss (smoothed), img/s and ETA.

    The ETA needs the run's length: max_steps, or epochs × steps per epoch; under a time
    budget alone the bar shows the budget left instead (a resumed run's earlier time counts).
    """

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.bar = None
        self.loss = None

    @hookimpl
    def minild_train_start(self, trainer):
        if not trainer.is_main_process:
            return
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True)
        mode = getattr(trainer, "compile_mode", "off")
        if mode != "off":
            self.bar.write(f"train: torch.compile (mode {mode}) compiles the model in the first steps: about a "
                           "minute on a fresh machine (train.compile: off skips it)")
        self.start, self.images = time.perf_counter(), 0
        self.losses_seen = len(trainer.losses)
        minutes = trainer.config.max_minutes
        budget = 60 * minutes - trainer.seconds_before if minutes is not None else None
        self.deadline = self.start + budget if budget is not None and trainer.total_steps is None else None

    @hookimpl
    def minild_train_step_end(self, trainer, batch_size):
        # Reads the losses the trainer has read back rather than taking ``loss``: on a GPU that
        # spares a host sync per step (the bar's loss then trails by up to train.loss_readback_every steps).
        if self.bar is None:
            return
        for loss in trainer.losses[self.losses_seen:]:
            self.loss = loss if self.loss is None else self.smoothing * self.loss + (1 - self.smoothing) * loss
        self.losses_seen = len(trainer.losses)
        self.images += batch_size
        now = time.perf_counter()
        postfix = {"loss": "…" if self.loss is None else f"{self.loss:.4f}",
                   "img_s": f"{self.images / max(now - self.start, 1e-9):.0f}"}
        if self.deadline is not None:
            postfix["left"] = tqdm.format_interval(max(self.deadline - now, 0))
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    @hookimpl
    def minild_train_end(self, reason):
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"loss={self.loss:.4f} stop={reason}" if self.loss is not None else f"stop={reason}")
        self.bar.close()
