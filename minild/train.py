"""The training loop: eps-MSE on random timesteps, AdamW, gradient clipping, trainer hooks.

Trainer hook plugins named in ``train.hooks`` are registered with the plugin manager for
the run and called through the ``minild_*`` hooks of ``minild.hookspecs``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from minild import plugins
from minild.conditioning import TrainingConditioner, wants_classes
from minild.config import TrainConfig, parse_stage

if TYPE_CHECKING:
    from minild.pipeline import Pipeline


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return torch.device(name)


@dataclass
class TrainResult:
    steps: int
    epochs_completed: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""


class Trainer:
    """Trains ``pipeline.model`` on a dataset of ``(image in [-1, 1], label)`` pairs."""

    def __init__(self, pipeline: "Pipeline", config: TrainConfig, run_dir=None):
        self.pipeline = pipeline
        self.config = config
        self.run_dir = run_dir
        self.device = resolve_device(config.device)
        self.model = pipeline.model
        self.schedule = pipeline.schedule
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.epoch = 0
        self._stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (for hooks)."""
        self._stop_reason = reason

    def fit(self, dataset) -> TrainResult:
        config = self.config
        if config.max_steps is None and config.epochs is None and config.max_minutes is None:
            raise ValueError("set at least one of train.max_steps, train.epochs or train.max_minutes")
        memory_format = torch.channels_last if config.channels_last and self.device.type != "mps" else torch.preserve_format
        self.model.to(self.device, memory_format=memory_format).train()
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        batches = _BatchSource(dataset, config.batch_size, self.device, generator)
        if wants_classes(self.model):
            batches.check_labels(self.model.num_classes)
        conditioner = TrainingConditioner(
            self.model, self.pipeline.text_encoder, getattr(dataset, "class_names", None),
            self.pipeline.config.data.prompt_templates, config.p_uncond, self.device,
        )

        pm = plugins.get_plugin_manager()
        hook_names = [self._register_hook(spec, index) for index, spec in enumerate(config.hooks)]
        result = TrainResult(steps=0, epochs_completed=0)
        start = time.perf_counter()
        try:
            pm.hook.minild_train_start(trainer=self)
            while self._stop_reason is None:
                epoch_loss, epoch_steps = 0.0, 0
                for x0, labels in batches.epoch():
                    x0 = x0.contiguous(memory_format=memory_format)
                    loss = self._train_step(x0, conditioner(labels, generator), generator)
                    self.step += 1
                    loss_value = loss.item()
                    epoch_loss, epoch_steps = epoch_loss + loss_value, epoch_steps + 1
                    result.losses.append(loss_value)
                    if not math.isfinite(loss_value):
                        self.request_stop(f"loss became {loss_value} at step {self.step}")
                    pm.hook.minild_train_step_end(
                        trainer=self, step=self.step, loss=loss_value, lr=self.optimizer.param_groups[0]["lr"],
                        batch_size=len(x0),
                    )
                    self._check_budget(start)
                    if self._stop_reason is not None:
                        break
                else:
                    self.epoch += 1
                    mean_loss = epoch_loss / max(epoch_steps, 1)
                    result.epoch_losses.append(mean_loss)
                    pm.hook.minild_train_epoch_end(trainer=self, epoch=self.epoch, mean_loss=mean_loss)
                    if config.epochs is not None and self.epoch >= config.epochs:
                        self.request_stop("epochs")
            pm.hook.minild_train_end(trainer=self, reason=self._stop_reason)
        finally:
            for name in hook_names:
                plugins.get_plugin_manager().unregister(name=name)
            self.model.to(memory_format=torch.contiguous_format)
        self.model.eval()
        result.steps, result.epochs_completed = self.step, self.epoch
        result.seconds = time.perf_counter() - start
        result.reason = self._stop_reason or ""
        return result

    def _train_step(self, x0, conditioning: dict, generator) -> torch.Tensor:
        # Algorithm 1 of DDPM: t ~ U{0, T−1}, ε ~ N(0, I), minimise ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖².
        t = torch.randint(0, self.schedule.num_timesteps, (len(x0),), generator=generator, device=self.device)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        x_t = self.schedule.add_noise(x0, noise, t)
        eps = self.model(x_t, t, **conditioning)
        loss = F.mse_loss(eps, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return loss

    def _check_budget(self, start: float) -> None:
        config = self.config
        if config.max_steps is not None and self.step >= config.max_steps:
            self.request_stop("max_steps")
        elif config.max_minutes is not None and time.perf_counter() - start >= 60 * config.max_minutes:
            self.request_stop("max_minutes")

    def _register_hook(self, spec: Any, index: int) -> str:
        stage = parse_stage("hooks", spec, "<train config>", f"train.hooks[{index}]")
        hook = plugins.create("hooks", stage.name, **stage.params)
        return plugins.get_plugin_manager().register(hook, name=f"trainer-hook-{index}-{stage.name}-{id(hook)}")


class _BatchSource:
    """Shuffled batches of ``(images [B, C, H, W], labels [B])`` on the training device.

    In-memory datasets (with ``.images`` and ``.labels``) are indexed directly; any
    other dataset goes through a DataLoader. The ragged last batch is dropped.
    """

    def __init__(self, dataset, batch_size: int, device: torch.device, generator: torch.Generator):
        self.device, self.generator = device, generator
        self.batch_size = min(batch_size, len(dataset))
        self.in_memory = hasattr(dataset, "images") and hasattr(dataset, "labels")
        if self.in_memory:
            self.images = dataset.images.to(device)
            self.labels = torch.as_tensor(dataset.labels, dtype=torch.long).to(device)
        else:
            self.dataset = dataset

    def check_labels(self, num_classes: int) -> None:
        if self.in_memory and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(
                f"dataset labels span [{int(self.labels.min())}, {int(self.labels.max())}] but the model has "
                f"num_classes={num_classes}: labels must lie in [0, {num_classes})"
            )

    def epoch(self):
        if self.in_memory:
            order = torch.randperm(len(self.images), generator=self.generator, device=self.device)
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                index = order[start : start + self.batch_size]
                yield self.images[index], self.labels[index]
            return
        seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=self.device))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        for images, labels in loader:
            yield images.to(self.device), torch.as_tensor(labels, dtype=torch.long).to(self.device)
