"""One optimizer step of the training loop, and the GPU-side choices around it: torch.compile of
the model, its memory format, and how often the loss is read back to the host.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from minild.config import TrainConfig

if TYPE_CHECKING:
    from minild.training.trainer import Trainer

# Steps between loss read-backs on an accelerator when no hook needs the loss every step: each
# read-back waits for the device to finish, so reading every step keeps the CPU from queueing ahead.
ACCELERATOR_LOSS_READBACK_EVERY = 50


def loss_readback_interval(config: TrainConfig, device: torch.device) -> int:
    """``train.loss_readback_every``, or by device: 1 on a CPU (a read-back costs nothing there),
    ``ACCELERATOR_LOSS_READBACK_EVERY`` on CUDA and MPS."""
    if config.loss_readback_every is not None:
        return config.loss_readback_every
    return 1 if device.type == "cpu" else ACCELERATOR_LOSS_READBACK_EVERY


# train.compile "auto". Measured on an H200 (benchmarks/README.md, "On a GPU"): the default digit
# model's Pipeline.train step under "reduce-overhead" (CUDA graphs) trains 2.4–2.5× the images per
# second of the eager step in the same layout at batch 64 and at 512 (about 1.8–2.1× the contiguous
# eager default, across two runs), after 40–50 s of compiling on a fresh machine (8 s once
# inductor's cache is warm); on a CPU compiling did not pay. So "auto" compiles on CUDA for runs
# planned to last long enough to win that time back several times over.
AUTO_COMPILE_MODE = "reduce-overhead"
AUTO_COMPILE_MIN_MINUTES = 5.0  # a train.max_minutes budget at least this long …
AUTO_COMPILE_MIN_STEPS = 20_000  # … and a planned length in steps (max_steps, epochs) at least this long


def resolve_compile(config: TrainConfig, device: torch.device, total_steps: int | None, world_size: int = 1) -> str:
    """``train.compile`` for this run: as configured, or for ``"auto"`` ``AUTO_COMPILE_MODE`` on a
    single CUDA device with Triton installed when the run is planned to be long (``max_minutes``
    unset or at least ``AUTO_COMPILE_MIN_MINUTES``, and ``total_steps`` unknown or at least
    ``AUTO_COMPILE_MIN_STEPS``), else ``"off"``."""
    if config.compile != "auto":
        return config.compile
    if device.type != "cuda" or world_size > 1 or importlib.util.find_spec("triton") is None:
        return "off"
    long_in_time = config.max_minutes is None or config.max_minutes >= AUTO_COMPILE_MIN_MINUTES
    long_in_steps = total_steps is None or total_steps >= AUTO_COMPILE_MIN_STEPS
    return AUTO_COMPILE_MODE if long_in_time and long_in_steps else "off"


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` under ``torch.compile`` for ``train.compile`` (the weights stay shared).

    ``"default"`` fuses kernels; ``"reduce-overhead"`` also captures CUDA graphs, which removes
    the per-kernel launch cost that bounds small models on big GPUs; ``"max-autotune"`` searches
    kernel configurations too. The first steps pay the compilation (tens of seconds).
    """
    if mode == "off":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def loss_weights(config: TrainConfig, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """The per-timestep weights of the ε-MSE for ``train.loss_weighting``: None for ``"uniform"``
    (DDPM's simple loss, every timestep alike); for ``"min_snr"``, Min-SNR-γ (Hang et al. 2023) for
    an ε-prediction model, ``w_t = min(SNR_t, γ) / SNR_t`` with ``SNR_t = ᾱ_t / (1 − ᾱ_t)`` and
    γ = ``train.min_snr_gamma``: the nearly clean timesteps (SNR above γ), whose gradients pull
    against the noisier ones' while doing little for the samples, count less, and the model
    converges in fewer steps (measured on the conditional configs in docs/conditional-defaults.md).
    ``[T]``, indexed by timestep."""
    if config.loss_weighting == "uniform":
        return None
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    return snr.clamp(max=config.min_snr_gamma) / snr


class TrainStep:
    """One optimizer step over ``grad_accumulation_steps`` forward-pass batches (the hot path:
    no host sync unless the loss is read back, ``read_loss=True``)."""

    def __init__(self, trainer: "Trainer", train_model, conditioner, memory_format, eager_model=None):
        self.trainer, self.model, self.conditioner = trainer, train_model, conditioner
        self.memory_format = memory_format
        # With train.compile "auto": the uncompiled model, to train on if compiling fails in the
        # first step (a model torch.compile cannot handle should not stop a run that did not ask).
        self.eager_model = eager_model
        precision = trainer.config.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(trainer.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        weights = loss_weights(trainer.config, trainer.schedule.alphas_cumprod.double())
        self.loss_weights = None if weights is None else weights.float().to(trainer.device)

    def __call__(self, micro_batches, *, read_loss: bool = True) -> float | torch.Tensor:
        """The step's mean loss: a float with ``read_loss`` (a NaN or inf loss then leaves the
        weights untouched), else a 0-dim tensor on the device (the step is always taken)."""
        trainer = self.trainer
        schedule, generator, optimizer, scaler = trainer.schedule, trainer.generator, trainer.optimizer, trainer.scaler
        processes, device = trainer.processes, trainer.device
        accumulation = len(micro_batches)
        optimizer.zero_grad(set_to_none=True)
        total = None
        for index, (x0, labels) in enumerate(micro_batches):
            # Every process draws for the whole batch, then trains on its shard of it.
            conditioning = self.conditioner(labels, generator)
            # Algorithm 1 of DDPM: t ~ U{0, T−1}, ε ~ N(0, I),
            # minimise ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖².
            t = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=generator, device=device)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            shard = processes.shard(len(x0))
            x0 = x0[shard].contiguous(memory_format=self.memory_format)
            x_t = schedule.add_noise(x0, noise[shard], t[shard])
            kwargs = {key: value[shard] for key, value in conditioning.items()}
            args = (x_t, t[shard], kwargs, noise[shard], accumulation, index == accumulation - 1)
            loss = self._first_compiled_pass(*args) if self.eager_model is not None else self._pass(*args)
            total = loss.detach() if total is None else total + loss.detach()
        total = processes.mean(total)
        loss_value = total.item() if read_loss else total
        if read_loss and not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            return loss_value
        if scaler is not None:
            scaler.unscale_(optimizer)
        if trainer.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        trainer.scheduler.step()
        return loss_value

    def _pass(self, x_t, t, kwargs, noise, accumulation: int, last: bool) -> torch.Tensor:
        """Forward and backward of one forward-pass batch; the loss, scaled for accumulation."""
        scaler = self.trainer.scaler
        with self.autocast():
            eps = self.model(x_t, t, **kwargs)
        if self.loss_weights is None:
            loss = F.mse_loss(eps.float(), noise) / accumulation
        else:
            per_image = (eps.float() - noise).pow(2).flatten(1).mean(dim=1)  # [B]
            loss = (per_image * self.loss_weights[t]).mean() / accumulation
        with self.trainer.processes.no_sync(self.model, last=last):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    def _first_compiled_pass(self, *args) -> torch.Tensor:
        """``_pass`` through the model ``"auto"`` compiled; if compiling fails, warn, train the
        eager model from here on (``trainer.compile_mode`` becomes "off") and redo the pass."""
        try:
            loss = self._pass(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; a model error recurs below
            warnings.warn(
                f"train.compile 'auto': torch.compile could not compile the model ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); training it uncompiled (train.compile: off "
                "says so up front)", stacklevel=2,
            )
            self.trainer.optimizer.zero_grad(set_to_none=True)
            self.model, self.trainer.compile_mode = self.eager_model, "off"
            loss = self._pass(*args)
        self.eager_model = None  # compiled (or fell back) once: no more checks
        return loss
