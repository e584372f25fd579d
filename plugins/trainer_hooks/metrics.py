"""The ``metrics_log`` (JSONL/CSV) and ``loss_plot`` (PNG) trainer hooks."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Literal

import torch

from minild import hookimpl
from minild.io import atomic_write
from minild_plugins.trainer_hooks.common import Rate, check_counts, every


class MetricsLog:
    """Writes one record per ``every_steps`` steps and one per epoch to ``run_dir/metrics.jsonl``
    (or ``metrics.csv``), buffered and appended every ``flush_every`` records, at epoch end,
    at each checkpoint and at the end. A resumed run drops the records after its checkpoint.
    The losses are those the trainer read back, taken when the records are written (so on a GPU
    the hook adds one read-back per ``flush_every`` records, not one per step).

    Step records: ``{"event": "step", "step", "epoch", "loss", "lr", "images_per_second", "time"}``;
    epoch records: ``{"event": "epoch", "step", "epoch", "mean_loss", "time"}``. ``epoch`` counts
    from 1 (the epoch the step belongs to, or the one that ended); ``time`` is in Unix seconds.
    """

    COLUMNS = ["event", "step", "epoch", "loss", "lr", "images_per_second", "mean_loss", "time"]
    writes_files = True

    def __init__(self, every_steps: int = 1, file_format: Literal["jsonl", "csv"] = "jsonl", flush_every: int = 100):
        if file_format not in ("jsonl", "csv"):
            raise ValueError(f"metrics_log file_format must be 'jsonl' or 'csv', got {file_format!r}")
        check_counts("metrics_log", every_steps=every_steps, flush_every=flush_every)
        self.every_steps, self.file_format, self.flush_every = every_steps, file_format, flush_every
        self.pending: list[dict] = []

    @hookimpl
    def minild_train_start(self, trainer):
        self.path = Path(trainer.run_dir) / f"metrics.{self.file_format}"
        self.active = trainer.is_main_process
        if not self.active:
            return
        kept = [r for r in self._read() if int(r["step"]) <= trainer.step] if trainer.resumed_from else []
        atomic_write(self.path, lambda tmp: self._write(tmp, kept, "w"))
        self.rate = Rate(trainer.step)
        self.trainer = trainer

    @hookimpl
    def minild_train_step_end(self, trainer, step, lr, batch_size):
        if not self.active or not every(step, self.every_steps):
            return
        rate = self.rate.update(step, batch_size)
        # The loss is filled in when the records are written, from ``trainer.losses``: taking
        # ``loss`` here would make the trainer read it back every step (a host sync on a GPU).
        self._add({"event": "step", "step": step, "epoch": trainer.epoch + 1, "loss": trainer.loss_count - 1,
                   "lr": lr, "images_per_second": round(rate, 2), "time": round(time.time(), 3)})

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
        if not self.pending:
            return
        self.trainer.read_back_losses()  # every flush_every records, not every step
        losses = self.trainer.losses
        for record in self.pending:
            if record["event"] == "step":  # "loss" holds the index of the step's loss until now
                index = record["loss"]
                record["loss"] = losses[index] if index < len(losses) else None  # None: a non-finite loss stopped the run
        self._write(self.path, self.pending, "a")
        self.pending = []

    def _write(self, path, records: list[dict], mode: str) -> None:
        # Whole lines in one write: a reader of the log never sees half a record.
        if self.file_format == "jsonl":
            text = "".join(json.dumps(record) + "\n" for record in records)
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, self.COLUMNS)
            if mode == "w":
                writer.writeheader()
            writer.writerows(records)
            text = buffer.getvalue()
        with open(path, mode + "b") as file:
            file.write(text.encode())

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

    writes_files = True

    def __init__(self, filename: str = "loss.png", every_epochs: int | None = 1):
        check_counts("loss_plot", every_epochs=every_epochs)
        self.filename, self.every_epochs = filename, every_epochs

    @hookimpl
    def minild_train_start(self, trainer):
        self.path = Path(trainer.run_dir) / self.filename

    @hookimpl
    def minild_train_epoch_end(self, trainer, epoch):
        if every(epoch, self.every_epochs):
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
