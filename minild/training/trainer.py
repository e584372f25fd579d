"""The training loop: eps-MSE on random timesteps, AdamW with warm-up and decay, gradient
accumulation and clipping, mixed precision, trainer hooks, and exact resume from checkpoints.

Trainer hook plugins named in ``train.hooks`` are registered with the plugin manager for
the run and called through the ``minild_*`` hooks of ``minild.hookspecs``.
"""

from __future__ import annotations

import math
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from minild import plugins
from minild.training import checkpoint, runs
from minild.conditioning import TrainingConditioner, wants_classes
from minild.training.batches import BatchSource
from minild.config import TrainConfig, parse_stage
from minild.devices import resolve_device, use_channels_last
from minild.training.distributed import Processes
from minild.training.interrupts import is_interrupt, stop_on_signals
from minild.io import check_writable_dir
from minild.training.step import TrainStep, compile_model, loss_readback_interval, resolve_compile

if TYPE_CHECKING:
    from minild.pipeline import Pipeline


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
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT) or SIGTERM, after finishing its step
    checkpoint: Path | None = None  # the newest checkpoint this call wrote
    trained_seconds: float = 0.0  # training time of the whole run, resumed parts included


class Trainer:
    """Trains ``pipeline.model`` on a dataset of ``(image in [-1, 1], label)`` pairs.

    ``resume``: a run directory (continue from its newest complete checkpoint) or one
    checkpoint directory; ``run_dir`` then defaults to that run directory. A ``run_dir`` that
    holds another run (``minild.training.runs.read_run``) is refused unless the trainer resumes that
    run or ``overwrite`` deletes it first.
    """

    def __init__(self, pipeline: "Pipeline", config: TrainConfig, run_dir: str | Path | None = None,
                 resume: str | Path | None = None, overwrite: bool = False):
        validate_train_config(config)
        if overwrite and resume is not None:
            raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite deletes it")
        self.pipeline = pipeline
        self.config = config
        self.resume = Path(resume) if resume is not None else None
        if run_dir is None and self.resume is not None:
            run_dir = checkpoint.run_dir_of(self.resume)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.processes = Processes(config.device)
        self.is_main_process = self.processes.is_main
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
        self.compile_mode = "off"  # train.compile as resolved for this run (minild.training.step.resolve_compile)
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        # Where the run is in the current epoch: its permutation of the dataset (None
        # until drawn), the forward-pass batches of it done, and their losses' sum.
        self.data_order: torch.Tensor | None = None
        self.batches_done = 0
        self.epoch_loss_sum = 0.0
        self.resumed_from: Path | None = None
        self.seconds_before = 0.0  # training time of the run before this call (from the checkpoint resumed)
        self._start: float | None = None
        self._stop_reason: str | None = None
        self._checkpoint: Path | None = None
        self._checkpointed_step: int | None = None
        self._state_written = False
        self._pending_losses: list[torch.Tensor] = []  # 0-dim device tensors not yet read back
        if self.run_dir is not None:
            self._claim_run_dir(overwrite)

    @property
    def trained_seconds(self) -> float:
        """Training time of the whole run so far: before this call (a resumed run) and in it."""
        return self.seconds_before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (for hooks); the first reason wins."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint into ``run_dir/checkpoints`` (see ``minild.training.checkpoint``) and
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
        self._checkpoint, self._checkpointed_step = path, self.step
        plugins.get_plugin_manager().hook.minild_checkpoint_saved(trainer=self, path=path, step=self.step)
        return path

    def fit(self, dataset) -> TrainResult:
        """Train until a budget runs out, a hook stops the run, or a signal does: while it runs (in
        the main thread) the first SIGINT or SIGTERM stops after the current step, with a
        checkpoint when there is a run directory; a second one raises ``KeyboardInterrupt``."""
        batches, train_step = self._prepare(dataset)
        resumed = self._resume() if self.resume is not None else None
        pm = plugins.get_plugin_manager()
        # pluggy calls the last registered first: register in reverse to call in config order.
        hook_names = [pm.register(hook, name=f"trainer-hook-{index}-{name}-{id(hook)}")
                      for index, name, hook in reversed(self._create_hooks())]
        self._start = start = time.perf_counter()
        try:
            with stop_on_signals(self.request_stop):
                pm.hook.minild_train_start(trainer=self)
                if resumed is not None:
                    checkpoint.restore_global_rng(resumed)
                self._train(batches, train_step, pm)
                pm.hook.minild_train_end(trainer=self, reason=self._stop_reason)
                self._finish()
                self.processes.close()
        finally:
            for name in hook_names:
                pm.unregister(name=name)
            self.model.to(memory_format=torch.contiguous_format)
        self.model.eval()
        return TrainResult(
            steps=self.step, epochs_completed=self.epoch, losses=list(self.losses),
            epoch_losses=list(self.epoch_losses), seconds=time.perf_counter() - start,
            reason=self._stop_reason or "", resumed_from=self.resumed_from, main_process=self.is_main_process,
            interrupted=is_interrupt(self._stop_reason), checkpoint=self._checkpoint,
            trained_seconds=self.trained_seconds,
        )

    def _claim_run_dir(self, overwrite: bool) -> None:
        if self.is_main_process:
            check_writable_dir(self.run_dir, "run directory")
        if overwrite:
            if self.is_main_process:
                runs.clear_run(self.run_dir)
        elif self.resume is None or checkpoint.run_dir_of(self.resume).resolve() != self.run_dir.resolve():
            runs.check_fresh(self.run_dir)  # every process refuses: none may wait for the others

    def _create_hooks(self) -> list[tuple[int, str, Any]]:
        """``(index, name, hook)`` for ``train.hooks``; without a run directory, those that
        write files are left out with one warning."""
        hooks, skipped = [], []
        for index, spec in enumerate(self.config.hooks):
            stage = parse_stage("hooks", spec, "<train config>", f"train.hooks[{index}]")
            hook = plugins.create("hooks", stage.name, **stage.params)
            if self.run_dir is None and getattr(hook, "writes_files", False):
                skipped.append(stage.name)
            else:
                hooks.append((index, stage.name, hook))
        if skipped:
            warnings.warn(
                f"training without a run directory: skipping the trainer hooks that write files "
                f"({', '.join(skipped)}); pass run_dir=... to Pipeline.train (the CLI's --out) to write them",
                stacklevel=4,
            )
        return hooks

    def _finish(self) -> None:
        """After ``minild_train_end``: an interrupted run gets a checkpoint of its last step (if
        no hook wrote one), and the run directory's ``run.json`` its final status."""
        if self.run_dir is None or not self.is_main_process:
            return
        if is_interrupt(self._stop_reason) and self._checkpointed_step != self.step:
            try:
                self.save_checkpoint()
            except checkpoint.CheckpointError as err:
                warnings.warn(f"{err}; not resumable from step {self.step}", stacklevel=2)
        self._write_run_state(runs.run_status(self._stop_reason))

    def _write_run_state(self, status: str) -> None:
        if self.run_dir is not None and self.is_main_process:
            runs.write_run_state(self.run_dir, self.pipeline.config, status=status, step=self.step,
                                 reason=self._stop_reason, trained_seconds=self.trained_seconds)
        self._state_written = True

    def _prepare(self, dataset) -> tuple["BatchSource", TrainStep]:
        """Put the model on the device, seed the generator, size the run and its LR schedule."""
        config = self.config
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        batches = BatchSource(dataset, config.batch_size, self.device, self.generator)
        self.dataset_size = batches.size
        self.steps_per_epoch = batches.num_batches // config.grad_accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {batches.size} images, too few for one optimizer step of train.batch_size × "
                f"train.grad_accumulation_steps = {config.batch_size * config.grad_accumulation_steps} images"
            )
        self.processes.check_batch_size(batches.batch_size)
        self.total_steps = _total_steps(config, self.steps_per_epoch)
        self.compile_mode = resolve_compile(config, self.device, self.total_steps, self.processes.world_size)
        channels_last = use_channels_last(config.channels_last, self.device, compiled=self.compile_mode != "off")
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model.to(self.device, memory_format=memory_format).train()
        train_model = self.processes.wrap(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.total_steps))
        if getattr(dataset, "class_names", None):
            self.pipeline.class_names = list(dataset.class_names)
        if wants_classes(self.model):
            batches.check_labels(self.model.num_classes)
        conditioner = TrainingConditioner(
            self.model, self.pipeline.text_encoder, getattr(dataset, "class_names", None),
            self.pipeline.config.data.prompt_templates, config.p_uncond, self.device,
        )
        return batches, TrainStep(
            self, compile_model(train_model, self.compile_mode), conditioner, memory_format,
            eager_model=train_model if config.compile == "auto" and self.compile_mode != "off" else None,
        )

    def _resume(self) -> checkpoint.Checkpoint:
        resumed = checkpoint.load_latest(self.resume)
        checkpoint.restore(self, resumed)
        same_run = self.run_dir is not None and resumed.path.parent.parent.resolve() == self.run_dir.resolve()
        if same_run and self.is_main_process:
            checkpoint.set_aside_newer(self.run_dir, resumed.step)
        self.resumed_from = resumed.path
        self._checkpointed_step = resumed.step
        return resumed

    def _train(self, batches: "BatchSource", train_step: TrainStep, pm) -> None:
        accumulation = self.config.grad_accumulation_steps
        # Hooks that name ``loss`` get a float every step (one host sync per step on a GPU); else
        # losses stay on the device and are read back every ``readback`` steps (minild.training.step).
        hooks_need_loss = any("loss" in impl.argnames for impl in pm.hook.minild_train_step_end.get_hookimpls())
        readback = 1 if hooks_need_loss else loss_readback_interval(self.config, self.device)
        self._check_budget()
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
                if not self._state_written:  # after a first step: every process has accepted the run dir
                    self._write_run_state("running")
                self._check_budget()
                if self._stop_reason is not None:
                    break
            else:
                self._end_epoch(pm)
                self._check_budget()
        self.read_back_losses()

    @property
    def loss_count(self) -> int:
        """Losses of the steps taken so far, read back into ``losses`` or still on the device."""
        return len(self.losses) + len(self._pending_losses)

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

    def _check_budget(self) -> None:
        config = self.config
        if config.max_steps is not None and self.step >= config.max_steps:
            self.request_stop("max_steps")
        elif config.epochs is not None and self.epoch >= config.epochs:
            self.request_stop("epochs")
        elif config.max_minutes is not None and self.trained_seconds >= 60 * config.max_minutes:
            self.request_stop("max_minutes")
        self._stop_reason = self.processes.agree_on_stop(self._stop_reason)


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
    for key in ("lr_schedule", "precision", "compile", "loss_weighting"):
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
        "min_snr_gamma": (config.min_snr_gamma > 0, "positive"),
        "seed": (0 <= config.seed < 2**64, "in [0, 2**64) (torch wraps a negative seed onto another one)"),
        "loss_readback_every": (config.loss_readback_every is None or config.loss_readback_every >= 1,
                                "at least 1 or null"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"train.{key} must be {expected}, got {getattr(config, key)!r}")
    if config.max_steps is None and config.epochs is None and config.max_minutes is None:
        raise ValueError("set at least one of train.max_steps, train.epochs or train.max_minutes")
