"""Built-in trainer hooks, each switched on by name in ``train.hooks``: ``progress`` (tqdm),
``metrics_log`` (JSONL/CSV), ``loss_plot`` (PNG), ``sample_grid`` (PNG), ``ema``, ``checkpoint``.
"""

from __future__ import annotations

import copy
import csv
import json
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from minild import checkpoint, hookimpl, plugins
from minild.images import grid_columns, grid_conditions, save_titled_grid
from minild.io import atomic_write


def _run_dir(trainer, hook: str) -> Path:
    if trainer.run_dir is None:
        raise ValueError(
            f"the {hook!r} trainer hook writes into the run directory, but the run has none: pass "
            "run_dir= to Pipeline.train (the CLI's --out) or remove the hook from train.hooks"
        )
    return Path(trainer.run_dir)


def _every(count: int, period: int | None) -> bool:
    return period is not None and count % period == 0


def _check_counts(hook: str, **counts: int | None) -> None:
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"the {hook!r} trainer hook's {key} must be at least 1 (or null: off), got {value}")


class ProgressBar:
    """tqdm bar over optimizer steps showing loss (smoothed), img/s and ETA.

    The ETA needs the run's length: max_steps, or epochs × steps per epoch; under a time
    budget alone the bar shows the budget left instead.
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
        self.start, self.images = time.perf_counter(), 0
        self.losses_seen = len(trainer.losses)
        minutes = trainer.config.max_minutes
        self.deadline = self.start + 60 * minutes if minutes is not None and trainer.total_steps is None else None

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


class MetricsLog:
    """Writes one record per ``every_steps`` steps and one per epoch to ``run_dir/metrics.jsonl``
    (or ``metrics.csv``), buffered and appended every ``flush_every`` records, at epoch end,
    at each checkpoint and at the end. A resumed run drops the records after its checkpoint.

    Step records: ``{"event": "step", "step", "epoch", "loss", "lr", "images_per_second", "time"}``;
    epoch records: ``{"event": "epoch", "step", "epoch", "mean_loss", "time"}``. ``epoch`` counts
    from 1 (the epoch the step belongs to, or the one that ended); ``time`` is in Unix seconds.
    """

    COLUMNS = ["event", "step", "epoch", "loss", "lr", "images_per_second", "mean_loss", "time"]

    def __init__(self, every_steps: int = 1, file_format: Literal["jsonl", "csv"] = "jsonl", flush_every: int = 100):
        if file_format not in ("jsonl", "csv"):
            raise ValueError(f"metrics_log file_format must be 'jsonl' or 'csv', got {file_format!r}")
        _check_counts("metrics_log", every_steps=every_steps, flush_every=flush_every)
        self.every_steps, self.file_format, self.flush_every = every_steps, file_format, flush_every
        self.pending: list[dict] = []

    @hookimpl
    def minild_train_start(self, trainer):
        self.path = _run_dir(trainer, "metrics_log") / f"metrics.{self.file_format}"
        self.active = trainer.is_main_process
        if not self.active:
            return
        kept = [r for r in self._read() if int(r["step"]) <= trainer.step] if trainer.resumed_from else []
        atomic_write(self.path, lambda tmp: self._write(tmp, kept, "w"))
        self.last_time, self.last_step = time.perf_counter(), trainer.step

    @hookimpl
    def minild_train_step_end(self, trainer, step, loss, lr, batch_size):
        if not self.active or not _every(step, self.every_steps):
            return
        now = time.perf_counter()
        rate = batch_size * (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        self._add({"event": "step", "step": step, "epoch": trainer.epoch + 1, "loss": loss, "lr": lr,
                   "images_per_second": round(rate, 2), "time": round(time.time(), 3)})

    @hookimpl
    def minild_train_epoch_end(self, trainer, epoch, mean_loss):
        if self.active:
            self._add({"event": "epoch", "step": trainer.step, "epoch": epoch, "mean_loss": mean_loss,
                       "time": round(time.time(), 3)})
            self.flush()

    @hookimpl
    def minild_checkpoint_saved(self):
        self.flush()

    @hookimpl
    def minild_train_end(self):
        self.flush()

    def _add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self._write(self.path, self.pending, "a")
            self.pending = []

    def _write(self, path, records: list[dict], mode: str) -> None:
        with open(path, mode, newline="") as file:
            if self.file_format == "jsonl":
                file.writelines(json.dumps(record) + "\n" for record in records)
                return
            writer = csv.DictWriter(file, self.COLUMNS)
            if mode == "w":
                writer.writeheader()
            writer.writerows(records)

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as file:
            if self.file_format == "jsonl":
                return [json.loads(line) for line in file if line.strip()]
            return list(csv.DictReader(file))


class LossPlot:
    """Writes ``run_dir/<filename>``: the loss per optimizer step (raw and smoothed) and the
    mean loss per epoch, like the Module 16 demo's curves; at every ``every_epochs`` epochs
    and at the end of training."""

    def __init__(self, filename: str = "loss.png", every_epochs: int | None = 1):
        _check_counts("loss_plot", every_epochs=every_epochs)
        self.filename, self.every_epochs = filename, every_epochs

    @hookimpl
    def minild_train_start(self, trainer):
        self.path = _run_dir(trainer, "loss_plot") / self.filename

    @hookimpl
    def minild_train_epoch_end(self, trainer, epoch):
        if _every(epoch, self.every_epochs):
            self.write(trainer)

    @hookimpl
    def minild_train_end(self, trainer):
        self.write(trainer)

    def write(self, trainer) -> None:
        if trainer.is_main_process:
            title = f"Training loss: {trainer.pipeline.config.model.name}, {trainer.step} steps, {trainer.epoch} epochs"
            atomic_write(self.path, lambda tmp: plot_losses(trainer.losses, trainer.epoch_losses, tmp, title))


def plot_losses(losses: list[float], epoch_losses: list[float], path, title: str) -> None:
    """Two panels, per step and per epoch, as a PNG; matplotlib's Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    per_step, per_epoch = figure.subplots(1, 2)
    steps = range(1, len(losses) + 1)
    per_step.plot(steps, losses, linewidth=0.5, alpha=0.5, label="per step")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()  # moving average
        per_step.plot(range(window, len(losses) + 1), smooth, linewidth=1.5, label=f"mean of {window} steps")
    per_step.set(title="Loss per step", xlabel="optimizer step", ylabel="MSE loss (ε prediction)")
    per_step.legend(loc="upper right")
    per_epoch.plot(range(1, len(epoch_losses) + 1), epoch_losses, marker="o")
    per_epoch.set(title="Mean loss per epoch", xlabel="epoch", ylabel="mean MSE loss")
    if not epoch_losses:
        per_epoch.text(0.5, 0.5, "no full epoch yet", ha="center", va="center", transform=per_epoch.transAxes)
    figure.suptitle(title)
    figure.savefig(path, format="png", dpi=100)


class SampleGrid:
    """Samples ``num_images`` with a fixed ``seed`` every ``every_steps`` steps and/or
    ``every_epochs`` epochs, with the EMA weights when the run keeps them, and writes
    ``run_dir/samples/step-000123.png``; the same seed makes grids comparable over training.
    Class-conditional models get one column per class."""

    def __init__(self, every_steps: int | None = None, every_epochs: int | None = 1, num_images: int = 20,
                 seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 1.0):
        _check_counts("sample_grid", every_steps=every_steps, every_epochs=every_epochs, num_images=num_images,
                      num_inference_steps=num_inference_steps)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.num_images, self.seed = num_images, seed
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.last_step = None

    @hookimpl
    def minild_train_start(self, trainer):
        self.directory = _run_dir(trainer, "sample_grid") / "samples"

    @hookimpl(trylast=True)
    def minild_train_step_end(self, trainer, step):
        if _every(step, self.every_steps):
            self.write(trainer)

    @hookimpl(trylast=True)
    def minild_train_epoch_end(self, trainer, epoch):
        if _every(epoch, self.every_epochs):
            self.write(trainer)

    def write(self, trainer) -> None:
        if not trainer.is_main_process or self.last_step == trainer.step:
            return
        pipe = trainer.pipeline
        images = pipe.generate(
            self.num_images, **grid_conditions(pipe, self.num_images), guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps, seed=self.seed, device=str(trainer.device),
        )
        trainer.model.train()  # generate() put it in eval mode
        path = self.directory / f"{checkpoint.checkpoint_dir_name(trainer.step)}.png"
        weights = "EMA" if pipe.ema_model is not None else "raw"
        title = f"Samples after {trainer.step} steps, {trainer.epoch} epochs (seed {self.seed}, {weights} weights)"
        if grid_columns(pipe) is not None:
            title += f"\none column per class: 0 … {grid_columns(pipe) - 1}"
        save_titled_grid(images, path, title, nrow=grid_columns(pipe))
        self.last_step = trainer.step
        hook = plugins.get_plugin_manager().hook
        hook.minild_samples_saved(trainer=trainer, path=path, step=trainer.step, images=images)


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


class Checkpointing:
    """Saves a checkpoint (``minild.checkpoint``) every ``every_steps`` steps, every
    ``every_epochs`` epochs and, with ``at_end``, when training stops; keeps the
    ``keep_last`` newest (all when null). Never writes NaN or inf weights: it stops the run
    instead, keeping the last good checkpoint."""

    def __init__(self, every_steps: int | None = None, every_epochs: int | None = 1, keep_last: int | None = 3,
                 at_end: bool = True):
        _check_counts("checkpoint", every_steps=every_steps, every_epochs=every_epochs, keep_last=keep_last)
        self.every_steps, self.every_epochs, self.keep_last, self.at_end = every_steps, every_epochs, keep_last, at_end

    @hookimpl
    def minild_train_start(self, trainer):
        run_dir = _run_dir(trainer, "checkpoint")
        existing = checkpoint.list_checkpoints(run_dir)
        resumed = trainer.resumed_from
        resumed_here = resumed is not None and resumed.parent.parent.resolve() == run_dir.resolve()
        if existing and not resumed_here:  # every process refuses: none may wait for the others
            raise ValueError(
                f"{run_dir} already holds checkpoints (newest: {existing[-1].name}): continue that run with "
                f"--resume {run_dir} (Pipeline.train(resume=...)), or train into another run directory"
            )
        if trainer.is_main_process:
            checkpoint.remove_leftovers(run_dir)
        self.saved = (trainer.step, trainer.epoch) if trainer.resumed_from is not None else None

    @hookimpl(trylast=True)
    def minild_train_step_end(self, trainer, step):
        if _every(step, self.every_steps):
            self.save(trainer, stop_on_error=True)

    @hookimpl(trylast=True)
    def minild_train_epoch_end(self, trainer, epoch):
        if _every(epoch, self.every_epochs):
            self.save(trainer, stop_on_error=True)

    @hookimpl(tryfirst=True)
    def minild_train_end(self, trainer):
        if self.at_end:
            self.save(trainer, stop_on_error=False)

    def save(self, trainer, *, stop_on_error: bool) -> None:
        if not trainer.is_main_process or self.saved == (trainer.step, trainer.epoch):
            return
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


@hookimpl
def register_trainer_hooks(register):
    register("progress", ProgressBar)
    register("metrics_log", MetricsLog)
    register("loss_plot", LossPlot)
    register("sample_grid", SampleGrid)
    register("ema", EMA)
    register("checkpoint", Checkpointing)
