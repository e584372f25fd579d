"""The ``ema`` trainer hook: an exponential moving average of the weights, which sampling uses."""

from __future__ import annotations

import copy

import torch

from minild import hookimpl


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
