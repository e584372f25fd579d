"""Built-in trainer hooks: a tqdm progress bar and an exponential moving average of the weights."""

from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm

from minild import hookimpl


class ProgressBar:
    """tqdm bar over optimizer steps showing loss (smoothed), img/s and ETA."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.bar = None
        self.loss = None

    @hookimpl
    def minild_train_start(self, trainer):
        config = trainer.config
        self.bar = tqdm(total=config.max_steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True)
        self.start, self.images = time.perf_counter(), 0

    @hookimpl
    def minild_train_step_end(self, step, loss, batch_size):
        self.loss = loss if self.loss is None else self.smoothing * self.loss + (1 - self.smoothing) * loss
        self.images += batch_size
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(loss=f"{self.loss:.4f}", img_s=f"{rate:.0f}", refresh=False)
        self.bar.update(1)

    @hookimpl
    def minild_train_end(self, reason):
        self.bar.set_postfix_str(f"loss={self.loss:.4f} stop={reason}" if self.loss is not None else f"stop={reason}")
        self.bar.close()


class EMA:
    """Keeps ``pipeline.ema_model``: θ_ema ← decay · θ_ema + (1 − decay) · θ after every step.

    ``warmup`` uses decay_t = min(decay, (1 + t) / (10 + t)) so early averages are not
    dominated by the random initial weights.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup

    @hookimpl
    def minild_train_start(self, trainer):
        pipeline = trainer.pipeline
        if pipeline.ema_model is None:
            pipeline.ema_model = copy.deepcopy(trainer.model).requires_grad_(False)
        pipeline.ema_model.to(next(trainer.model.parameters()).device)
        self.ema_params = list(pipeline.ema_model.parameters())
        self.ema_buffers = list(pipeline.ema_model.buffers())
        self.params = list(trainer.model.parameters())
        self.buffers = list(trainer.model.buffers())

    @hookimpl
    def minild_train_step_end(self, step):
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
            for ema_buffer, buffer in zip(self.ema_buffers, self.buffers):
                ema_buffer.copy_(buffer)  # BatchNorm statistics follow the live model

    @hookimpl
    def minild_train_end(self, trainer):
        # Same memory format as a reloaded model, so samples match bit for bit after a reload.
        trainer.pipeline.ema_model.to(memory_format=torch.contiguous_format).eval()


@hookimpl
def register_trainer_hooks(register):
    register("progress", ProgressBar)
    register("ema", EMA)
