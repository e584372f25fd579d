"""The training loop: eps-MSE on random timesteps, AdamW with warm-up and decay, gradient
accumulation and clipping, mixed precision, trainer hooks, and exact resume from checkpoints.

Trainer hook plugins named in ``train.hooks`` are registered with the plugin manager for
the run and called through the ``minild_*`` hooks of ``minild.hookspecs``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from minild import checkpoint, plugins
from minild.conditioning import TrainingConditioner, wants_classes
from minild.config import TrainConfig, parse_stage
from minild.io import check_writable_dir
from minild.train_step import TrainStep, compile_model, loss_readback_interval

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
    steps: int  # optimizer steps done in all, resumed ones included
    epochs_completed: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step since step 0
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # of this call
    reason: str = ""
    resumed_from: Path | None = None  # the checkpoint this call continued from
    main_process: bool = True  # False on the other processes of a multi-process run


class Trainer:
    """Trains ``pipeline.model`` on a dataset of ``(image in [-1, 1], label)`` pairs.

    ``resume``: a run directory (continue from its newest complete checkpoint) or one
    checkpoint directory; ``run_dir`` then defaults to that run directory.
    """

    def __init__(self, pipeline: "Pipeline", config: TrainConfig, run_dir: str | Path | None = None,
                 resume: str | Path | None = None):
        validate_train_config(config)
        self.pipeline = pipeline
        self.config = config
        self.resume = Path(resume) if resume is not None else None
        if run_dir is None and self.resume is not None:
            run_dir = checkpoint.run_dir_of(self.resume)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.processes = _Processes(config.device)
        self.is_main_process = self.processes.is_main
        if self.run_dir is not None and self.is_main_process:
            check_writable_dir(self.run_dir, "run directory")
        self.device = self.processes.device or resolve_device(config.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"train.precision 'fp16' needs a CUDA device (it trains with a GradScaler) but the device is "
                f"{self.device.type}: use 'bf16' or 'fp32'"
            )
        self.model = pipeline.model
        self.schedule = pipeline.schedule
        # The fused kernel does AdamW's whole update in one pass over each tensor (a few percent of a
        # training step on a CPU); it exists for CPU and CUDA parameters only.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None  # set by fit, once the run length is known
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.generator: torch.Generator | None = None
        self.step = 0
        self.epoch = 0
        self.steps_per_epoch = 0
        self.total_steps: int | None = None
        self.dataset_size = 0
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        # Where the run is in the current epoch: its permutation of the dataset (None
        # until drawn), the forward-pass batches of it done, and their losses' sum.
        self.data_order: torch.Tensor | None = None
        self.batches_done = 0
        self.epoch_loss_sum = 0.0
        self.resumed_from: Path | None = None
        self._stop_reason: str | None = None
        self._pending_losses: list[torch.Tensor] = []  # 0-dim device tensors not yet read back

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (for hooks); the first reason wins."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint into ``run_dir/checkpoints`` (see ``minild.checkpoint``) and
        call ``minild_checkpoint_saved``; on a multi-process run only the main process writes
        (the others return None). Raises ``CheckpointError`` for NaN or inf weights."""
        if not self.is_main_process:
            return None
        if self.run_dir is None:
            raise ValueError("cannot save a checkpoint: the trainer has no run_dir")
        self.read_back_losses()
        if self._stop_reason is not None and self._stop_reason.startswith("non-finite loss"):
            return None
        path = checkpoint.save_checkpoint(self)
        plugins.get_plugin_manager().hook.minild_checkpoint_saved(trainer=self, path=path, step=self.step)
        return path

    def fit(self, dataset) -> TrainResult:
        batches, train_step = self._prepare(dataset)
        resumed = self._resume() if self.resume is not None else None
        pm = plugins.get_plugin_manager()
        # pluggy calls the last registered first: register in reverse to call in config order.
        hook_names = [self._register_hook(spec, index) for index, spec in reversed(list(enumerate(self.config.hooks)))]
        start = time.perf_counter()
        try:
            pm.hook.minild_train_start(trainer=self)
            if resumed is not None:
                checkpoint.restore_global_rng(resumed)
            self._train(batches, train_step, pm, start)
            pm.hook.minild_train_end(trainer=self, reason=self._stop_reason)
        finally:
            for name in hook_names:
                pm.unregister(name=name)
            self.model.to(memory_format=torch.contiguous_format)
        self.model.eval()
        return TrainResult(
            steps=self.step, epochs_completed=self.epoch, losses=list(self.losses),
            epoch_losses=list(self.epoch_losses), seconds=time.perf_counter() - start,
            reason=self._stop_reason or "", resumed_from=self.resumed_from, main_process=self.is_main_process,
        )

    def _prepare(self, dataset) -> tuple["_BatchSource", TrainStep]:
        """Put the model on the device, seed the generator, size the run and its LR schedule."""
        config = self.config
        channels_last = config.channels_last and self.device.type != "mps"
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model.to(self.device, memory_format=memory_format).train()
        train_model = self.processes.wrap(self.model)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        batches = _BatchSource(dataset, config.batch_size, self.device, self.generator)
        self.dataset_size = batches.size
        self.steps_per_epoch = batches.num_batches // config.grad_accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {batches.size} images, too few for one optimizer step of train.batch_size × "
                f"train.grad_accumulation_steps = {config.batch_size * config.grad_accumulation_steps} images"
            )
        self.processes.check_batch_size(batches.batch_size)
        self.total_steps = _total_steps(config, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.total_steps))
        if getattr(dataset, "class_names", None):
            self.pipeline.class_names = list(dataset.class_names)
        if wants_classes(self.model):
            batches.check_labels(self.model.num_classes)
        conditioner = TrainingConditioner(
            self.model, self.pipeline.text_encoder, getattr(dataset, "class_names", None),
            self.pipeline.config.data.prompt_templates, config.p_uncond, self.device,
        )
        return batches, TrainStep(self, compile_model(train_model, config.compile), conditioner, memory_format)

    def _resume(self) -> checkpoint.Checkpoint:
        resumed = checkpoint.load_latest(self.resume)
        checkpoint.restore(self, resumed)
        same_run = self.run_dir is not None and resumed.path.parent.parent.resolve() == self.run_dir.resolve()
        if same_run and self.is_main_process:
            checkpoint.set_aside_newer(self.run_dir, resumed.step)
        self.resumed_from = resumed.path
        return resumed

    def _train(self, batches: "_BatchSource", train_step: TrainStep, pm, start: float) -> None:
        accumulation = self.config.grad_accumulation_steps
        # Hooks that name ``loss`` get a float every step (one host sync per step on a GPU); else
        # losses stay on the device and are read back every ``readback`` steps (minild.train_step).
        hooks_need_loss = any("loss" in impl.argnames for impl in pm.hook.minild_train_step_end.get_hookimpls())
        readback = 1 if hooks_need_loss else loss_readback_interval(self.config, self.device)
        self._check_budget(start)
        while self._stop_reason is None:
            if self.data_order is None:
                self.data_order = batches.shuffle()
            for micro_batches in batches.steps(self.data_order, self.batches_done, accumulation, self.steps_per_epoch):
                lr = self.optimizer.param_groups[0]["lr"]
                loss = train_step(micro_batches, read_loss=readback == 1)
                if readback == 1 and not math.isfinite(loss):
                    self.request_stop(
                        f"non-finite loss ({loss}) at step {self.step + 1}: that step was not taken, "
                        f"the weights are those after step {self.step}"
                    )
                    break
                self.step += 1
                self.batches_done += accumulation
                if readback == 1:
                    self.losses.append(loss)
                    self.epoch_loss_sum += loss
                else:
                    self._pending_losses.append(loss)
                    if len(self._pending_losses) >= readback:
                        self.read_back_losses()
                pm.hook.minild_train_step_end(
                    trainer=self, step=self.step, loss=loss if readback == 1 else None, lr=lr,
                    batch_size=batches.batch_size * accumulation,
                )
                self._check_budget(start)
                if self._stop_reason is not None:
                    break
            else:
                self._end_epoch(pm)
                self._check_budget(start)
        self.read_back_losses()

    def read_back_losses(self) -> None:
        """Move the losses still on the device into ``losses`` (one host sync); a non-finite one
        stops the run. Called every ``readback`` steps, at the end of an epoch, before a
        checkpoint and at the end of training."""
        if not self._pending_losses:
            return
        values = torch.stack(self._pending_losses).tolist()
        first_step = self.step - len(values) + 1
        self._pending_losses = []
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                self.request_stop(
                    f"non-finite loss ({value}) at step {first_step + offset}, read back at step {self.step} "
                    f"(train.loss_readback_every): the weights are those after step {self.step}; the last "
                    "checkpoint predates it"
                )
                break
            self.losses.append(value)
            self.epoch_loss_sum += value

    def _end_epoch(self, pm) -> None:
        self.read_back_losses()
        mean_loss = self.epoch_loss_sum / max(self.batches_done // self.config.grad_accumulation_steps, 1)
        self.epoch += 1
        self.epoch_losses.append(mean_loss)
        self.data_order, self.batches_done, self.epoch_loss_sum = None, 0, 0.0
        pm.hook.minild_train_epoch_end(trainer=self, epoch=self.epoch, mean_loss=mean_loss)

    def _check_budget(self, start: float) -> None:
        config = self.config
        if config.max_steps is not None and self.step >= config.max_steps:
            self.request_stop("max_steps")
        elif config.epochs is not None and self.epoch >= config.epochs:
            self.request_stop("epochs")
        elif config.max_minutes is not None and time.perf_counter() - start >= 60 * config.max_minutes:
            self.request_stop("max_minutes")
        self._stop_reason = self.processes.agree_on_stop(self._stop_reason)

    def _register_hook(self, spec: Any, index: int) -> str:
        stage = parse_stage("hooks", spec, "<train config>", f"train.hooks[{index}]")
        hook = plugins.create("hooks", stage.name, **stage.params)
        return plugins.get_plugin_manager().register(hook, name=f"trainer-hook-{index}-{stage.name}-{id(hook)}")


def lr_factor(config: TrainConfig, total_steps: int | None) -> Callable[[int], float]:
    """The multiplier of ``train.lr`` at optimizer step ``step`` (0-based): a linear warm-up
    from 1/warmup_steps to 1, then constant, or a cosine or linear decay reaching 0 after
    ``total_steps``."""
    warmup, shape = config.warmup_steps, config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if shape == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress

    return factor


def _total_steps(config: TrainConfig, steps_per_epoch: int) -> int | None:
    """The run's length in optimizer steps, or None when only a time budget bounds it."""
    bounds = [config.max_steps] if config.max_steps is not None else []
    if config.epochs is not None:
        bounds.append(config.epochs * steps_per_epoch)
    if not bounds and config.lr_schedule != "constant":
        raise ValueError(
            f"train.lr_schedule {config.lr_schedule!r} decays over the run's length: set train.max_steps or "
            "train.epochs (a max_minutes budget alone does not say how many steps there will be)"
        )
    return min(bounds) if bounds else None


def validate_train_config(config: TrainConfig) -> None:
    """Reject values the config's types cannot (ranges, and choices given as ``train()`` overrides)."""
    hints = typing.get_type_hints(TrainConfig)
    for key in ("lr_schedule", "precision", "compile"):
        choices = typing.get_args(hints[key])
        if getattr(config, key) not in choices:
            options = ", ".join(map(repr, choices))
            raise ValueError(f"train.{key} must be one of {options}, got {getattr(config, key)!r}")
    checks = {
        "batch_size": (config.batch_size >= 1, "at least 1"),
        "grad_accumulation_steps": (config.grad_accumulation_steps >= 1, "at least 1"),
        "lr": (config.lr > 0, "positive"),
        "warmup_steps": (config.warmup_steps >= 0, "0 or more"),
        "weight_decay": (config.weight_decay >= 0, "0 or more"),
        "grad_clip": (config.grad_clip is None or config.grad_clip > 0, "positive or null"),
        "max_steps": (config.max_steps is None or config.max_steps >= 1, "at least 1 or null"),
        "epochs": (config.epochs is None or config.epochs >= 1, "at least 1 or null"),
        "max_minutes": (config.max_minutes is None or config.max_minutes > 0, "positive or null"),
        "p_uncond": (0.0 <= config.p_uncond <= 1.0, "in [0, 1]"),
        "loss_readback_every": (config.loss_readback_every is None or config.loss_readback_every >= 1,
                                "at least 1 or null"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"train.{key} must be {expected}, got {getattr(config, key)!r}")
    if config.max_steps is None and config.epochs is None and config.max_minutes is None:
        raise ValueError("set at least one of train.max_steps, train.epochs or train.max_minutes")


class _BatchSource:
    """Batches of ``(images [B, C, H, W], labels [B])`` on the training device, in the order
    of a permutation of the dataset drawn from the trainer's generator once per epoch.

    In-memory datasets (with ``.images`` and ``.labels``) are indexed directly; any other
    dataset goes through a DataLoader. The ragged last batch is dropped.
    """

    def __init__(self, dataset, batch_size: int, device: torch.device, generator: torch.Generator):
        self.device, self.generator = device, generator
        self.size = len(dataset)
        self.batch_size = min(batch_size, self.size)
        self.num_batches = self.size // self.batch_size
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

    def shuffle(self) -> torch.Tensor:
        """The next epoch's order: a permutation ``[N]`` of the dataset indices."""
        return torch.randperm(self.size, generator=self.generator, device=self.generator.device)

    def steps(self, order: torch.Tensor, start: int, group: int, num_steps: int):
        """Lists of ``group`` consecutive batches of ``order``, from batch ``start`` up to the
        end of the epoch's ``num_steps`` whole steps."""
        batches = self._batches(order, start, num_steps * group)
        while chunk := list(itertools.islice(batches, group)):
            yield chunk

    def _batches(self, order: torch.Tensor, start: int, stop: int):
        size = self.batch_size
        if self.in_memory:
            for batch in range(start, stop):
                index = order[batch * size : (batch + 1) * size]
                yield self.images[index], self.labels[index]
            return
        order = order.cpu()
        batch_sampler = [order[batch * size : (batch + 1) * size].tolist() for batch in range(start, stop)]
        for images, labels in torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler):
            yield images.to(self.device), torch.as_tensor(labels, dtype=torch.long).to(self.device)


class _Processes:
    """The processes of a run launched by ``accelerate launch`` (or torchrun), or just this one.

    Every process holds the whole dataset and identically seeded generators, so all draw the
    same global batch, timesteps and noise; each trains on its contiguous shard of the batch
    and DDP averages the gradients, which makes the run that of one process with the same
    ``batch_size`` up to float summation order. Only the main process writes files.
    """

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.device, self.accelerator = 0, None, None
        if self.world_size > 1:
            from accelerate import Accelerator

            # minild's own train.precision decides autocast; accelerate only wraps the model.
            cpu = resolve_device(device_name).type == "cpu"
            self.accelerator = Accelerator(cpu=cpu, mixed_precision="no")
            if self.accelerator.num_processes != self.world_size:
                raise RuntimeError(
                    f"launched as {self.world_size} processes but accelerate set up {self.accelerator.num_processes}: "
                    "launch with `accelerate launch --multi_gpu` or torchrun (gloo on CPUs)"
                )
            self.rank, self.device = self.accelerator.process_index, self.accelerator.device
            # Tear the process group down before the interpreter does: gloo's threads abort
            # a process that exits with them still running.
            atexit.register(self.accelerator.end_training)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size {batch_size} must split evenly over the {self.world_size} processes "
                "(it is the global batch)"
            )

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.accelerator is None else self.accelerator.prepare_model(model)

    def shard(self, batch_size: int) -> slice:
        if self.world_size == 1:
            return slice(None)
        size = batch_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def no_sync(self, model, *, last: bool):
        """Skip the gradient all-reduce on all but the last forward pass of an accumulated step."""
        return contextlib.nullcontext() if last or self.accelerator is None else self.accelerator.no_sync(model)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.accelerator is None else self.accelerator.reduce(value, "mean")

    def agree_on_stop(self, reason: str | None) -> str | None:
        """Stop all processes when any one wants to, with the first process's reason."""
        if self.accelerator is None:
            return reason
        wants = torch.tensor([reason is not None], dtype=torch.int32, device=self.device)
        if not self.accelerator.reduce(wants, "sum").item():
            return None
        reasons = [None] * self.world_size
        torch.distributed.all_gather_object(reasons, reason)
        return next(r for r in reasons if r is not None)
