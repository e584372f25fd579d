"""``Pipeline.distill``: a few-step student of a guided class-conditional run, whose guidance scale
is an input (guided distillation, then progressive halving; docs/distillation.md). Checkpointed
and resumed exactly like training; the student is saved as an ordinary run directory."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minild import plugins
from minild.conditioning import wants_classes, wants_guidance_scale, wants_text
from minild.config import StageSpec
from minild.devices import resolve_device
from minild.images import save_labeled_grid
from minild.io import atomic_write
from minild.training import checkpoint, checkpoint_state
from minild.training.distill_targets import guided_eps_loss, progressive_loss
from minild.training.interrupts import is_interrupt, stop_on_signals

STATE_NAME = "distill.json"
PHASES_DIR = "phases"  # phases/steps-N/: the student after each halving, a run directory of its own
GRID_SCALES = (1.0, 2.0, 4.0)  # the rows of every phase's sample grid


@dataclass
class DistillConfig:
    """What ``Pipeline.distill`` takes besides the directories (``minild distill`` sets the first two)."""

    steps: int = 4  # the student's chain: a power of two
    max_minutes: float | None = None  # the whole distillation's budget, split evenly between the phases
    start_steps: int | None = None  # the chain of the first halving's teacher (None: max(16, steps))
    phase_iterations: int = 400  # optimizer steps per phase (the guided phase and each halving)
    batch_size: int = 64
    lr: float = 2e-4
    guidance_scale_range: list[float] = field(default_factory=lambda: [1.0, 4.0])  # w ~ U[low, high]
    checkpoint_every_minutes: float = 1.0
    keep_last: int = 2
    max_steps: int | None = None  # stop (resumably) after this many optimizer steps in all
    seed: int = 0
    device: str | None = None  # None: the teacher's train.device
    teacher_dir: str | None = None  # where the teacher is saved, recorded so cfg-digits can plot the student beside it

    def check(self) -> None:
        """ValueErrors that name the option and the fix."""
        for name in ("steps", "phase_iterations", "batch_size", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"distill: {name} must be a positive integer, got {value!r}")
        for name in ("steps", "start_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                                      or value & (value - 1)):
                raise ValueError(f"distill: {name} must be a power of two (1, 2, 4, 8, …): each phase halves the "
                                 f"chain; got {value!r}")
        if self.start_steps is not None and self.start_steps < self.steps:
            raise ValueError(f"distill: start_steps ({self.start_steps}) must be at least steps ({self.steps})")
        low, high = (list(self.guidance_scale_range) + [None, None])[:2]
        if len(self.guidance_scale_range) != 2 or not (isinstance(low, (int, float)) and isinstance(high, (int, float))
                                                       and 0 <= low <= high):
            raise ValueError(f"distill: guidance_scale_range must be [low, high] with 0 <= low <= high, "
                             f"got {self.guidance_scale_range!r}")
        self.guidance_scale_range = [float(low), float(high)]  # as a checkpoint records it
        for name in ("max_minutes", "max_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"distill: {name} must be > 0 or None, got {value!r}")

    def phases(self) -> list[tuple[str, int]]:
        """``[("guided", n0), ("halve", n0/2), …, ("halve", steps)]``: each phase's kind and student chain."""
        start = self.start_steps or max(16, self.steps)
        phases, steps = [("guided", start)], start
        while steps > self.steps:
            steps //= 2
            phases.append(("halve", steps))
        return phases


@dataclass
class DistillResult:
    student: Any  # the student Pipeline
    out_dir: Path
    steps: int  # optimizer steps, all phases, resumed ones included
    phase: int  # phases finished
    reason: str  # "finished", "max_steps", "interrupted (SIGINT)", …
    seconds: float
    losses: list[float]
    checkpoint: Path | None = None
    resumed_from: Path | None = None

    @property
    def interrupted(self) -> bool:
        return is_interrupt(self.reason)

    @property
    def finished(self) -> bool:
        return self.reason == "finished"


def check_teacher(pipe) -> None:
    """A class-conditional run trained with condition dropout, not itself a student."""
    model = pipe.model
    if wants_guidance_scale(model):
        raise ValueError("this run is already a distilled student: distill the teacher run it came from")
    if wants_text(model):
        raise ValueError("distillation of text-conditional runs is not supported yet: distill a class-conditional "
                         "run (model.num_classes, e.g. configs/digits_class_cfg.yaml)")
    if not wants_classes(model) or not hasattr(model, "class_embedding"):
        raise ValueError(f"model {pipe.config.model.name!r} is not class-conditional: distillation needs a guided "
                         "class-conditional run (model.num_classes and train.p_uncond > 0, e.g. "
                         "configs/digits_class_cfg.yaml)")
    if pipe.config.train.p_uncond <= 0:
        raise ValueError("the run was trained without condition dropout (train.p_uncond = 0), so it has no "
                         "unconditional model to guide with: train it with train.p_uncond: 0.1")


def student_config(pipe, num_steps: int):
    """The teacher's config with the ``guided_student`` model and the ``distilled`` sampler."""
    config = copy.deepcopy(pipe.config)
    guidance = config.guidance or StageSpec("cfg", {"scale": 1.0})
    scale = plugins.create("guidance", guidance.name, **guidance.params).scale
    config.model = StageSpec("guided_student", {"teacher": pipe.config.model.to_dict(), "in_channels": pipe.image_shape[0],
                                                "default_guidance_scale": scale})
    config.sampler = StageSpec("distilled", {"num_inference_steps": num_steps})
    config.guidance = guidance
    config.image_shape = list(pipe.image_shape)
    return config


class Distiller:
    """The loop over phases and steps; its state is what a checkpoint holds."""

    def __init__(self, pipe, out_dir: Path, config: DistillConfig, *, resume: bool = False):
        check_teacher(pipe)
        config.check()
        self.pipe, self.out_dir, self.config = pipe, Path(out_dir), config
        self.phases = config.phases()
        self.device = resolve_device(config.device or pipe.config.train.device)
        self.teacher = copy.deepcopy(pipe.ema_model if pipe.ema_model is not None else pipe.model)
        self.teacher.to(self.device).eval().requires_grad_(False)
        self.student = type(pipe).from_config(student_config(pipe, self.phases[0][1]))
        self.student.model.model.load_state_dict(self.teacher.state_dict())
        self.student.class_names = pipe.class_names
        self.model = self.student.model.to(self.device).train()
        self.phase_teacher = None  # the previous phase's student, frozen, in a halving phase
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = self.phase = self.phase_step = 0
        self.phase_seconds = self.seconds_before = 0.0
        self.losses: list[float] = []
        self.phase_ends: list[int] = []
        self.optimizer = self._new_optimizer()
        self.stop_reason: str | None = None
        self.resumed_from = self._resume() if resume else None
        if self.resumed_from is None:
            self._check_fresh()

    # -- state --------------------------------------------------------------------

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=0.0)

    def _check_fresh(self) -> None:
        if (self.out_dir / STATE_NAME).is_file() or checkpoint.list_checkpoints(self.out_dir):
            raise ValueError(f"{self.out_dir} already holds a distillation: continue it with resume=True "
                             "(`minild distill RUN --out DIR --resume`), or distill into another directory")
        if (self.out_dir / "run.json").is_file():
            raise ValueError(f"{self.out_dir} holds a training run: distill into another directory (--out)")

    def save_checkpoint(self) -> Path:
        tensors = {"student": self.model.state_dict()}
        if self.phase_teacher is not None:
            tensors["teacher"] = self.phase_teacher.state_dict()
        optimizer_tensors, optimizer_state = checkpoint_state.split_optimizer_state(self.optimizer.state_dict())
        tensors["optimizer"] = optimizer_tensors
        tensors["distiller"] = {"generator": self.generator.get_state(),
                                "losses": torch.tensor(self.losses, dtype=torch.float64)}
        state = {"step": self.step, "phase": self.phase, "phase_step": self.phase_step,
                 "phase_seconds": self.phase_seconds, "seconds": self.seconds, "phase_ends": self.phase_ends,
                 "optimizer": optimizer_state, "distill": dataclasses.asdict(self.config)}
        path = checkpoint.write_checkpoint(self.out_dir, self.step, tensors, state)
        checkpoint.prune_checkpoints(self.out_dir, self.config.keep_last, keep=path)
        self._write_state("running")
        return path

    def _resume(self) -> Path | None:
        if not checkpoint.list_checkpoints(self.out_dir):
            return None  # stopped before its first checkpoint: starts over
        saved = checkpoint.load_latest(self.out_dir)
        state, tensors = saved.state, saved.tensors
        kept = {key: state["distill"][key] for key in ("steps", "start_steps", "phase_iterations", "batch_size", "lr",
                                                        "guidance_scale_range", "seed")}
        if kept != {key: getattr(self.config, key) for key in kept}:
            raise ValueError(f"{self.out_dir} was distilled with other settings ({kept}): resume with the same ones, "
                             "or distill into another directory")
        self.phase, self.phase_step, self.step = state["phase"], state["phase_step"], state["step"]
        self._set_phase_sampler()
        self.model.load_state_dict(tensors["student"])
        if "teacher" in tensors:
            self.phase_teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.phase_teacher.load_state_dict(tensors["teacher"])
        self.optimizer.load_state_dict(checkpoint_state.join_optimizer_state(tensors["optimizer"], state["optimizer"]))
        self.generator.set_state(tensors["distiller"]["generator"])
        self.losses = tensors["distiller"]["losses"].tolist()
        self.phase_seconds, self.seconds_before = state["phase_seconds"], state["seconds"]
        self.phase_ends = state["phase_ends"]
        return saved.path

    @property
    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self._started if hasattr(self, "_started") else 0.0)

    def _write_state(self, status: str, reason: str | None = None) -> None:
        state = {"status": status, "reason": reason, "step": self.step, "phase": self.phase,
                 "phases": [f"{kind} {steps}" for kind, steps in self.phases], "seconds": round(self.seconds, 3),
                 "teacher": self.config.teacher_dir, "distill": dataclasses.asdict(self.config)}
        atomic_write(self.out_dir / STATE_NAME, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1)))

    def _set_phase_sampler(self) -> None:
        steps = self.phases[min(self.phase, len(self.phases) - 1)][1]
        self.student.config.sampler = StageSpec("distilled", {"num_inference_steps": steps})
        self.student.sampler = self.student._build_sampler(self.student.config.sampler)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> DistillResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_leftovers(self.out_dir)
        images, labels = self._training_data()
        total = len(self.phases) * self.config.phase_iterations
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, desc="distill", unit="step", dynamic_ncols=True)
        self._started = time.perf_counter()
        last_checkpoint, saved = time.perf_counter(), None
        try:
            with stop_on_signals(self.request_stop):
                while self.phase < len(self.phases) and self.stop_reason is None:
                    started = time.perf_counter()
                    loss = self._train_step(images, labels)
                    self.phase_seconds += time.perf_counter() - started
                    self.losses.append(loss)
                    self.step += 1
                    self.phase_step += 1
                    kind, steps = self.phases[self.phase]
                    bar.set_postfix({"phase": f"{self.phase + 1}/{len(self.phases)} {kind} {steps}", "loss": f"{loss:.4f}"},
                                    refresh=False)
                    bar.update(1)
                    if self._phase_done():
                        self._end_phase()
                        saved, last_checkpoint = self.save_checkpoint(), time.perf_counter()
                    elif time.perf_counter() - last_checkpoint >= 60 * self.config.checkpoint_every_minutes:
                        saved, last_checkpoint = self.save_checkpoint(), time.perf_counter()
                    if self.config.max_steps is not None and self.step >= self.config.max_steps:
                        self.request_stop("max_steps")
                reason = self.stop_reason or "finished"
                if saved is None or int(saved.name.split("-")[1]) != self.step:
                    saved = self.save_checkpoint() if self.step > 0 else None
        finally:
            bar.close()
        self._set_phase_sampler()
        self.model.eval()
        self.student.save_pretrained(self.out_dir)
        plot_losses(self.losses, self.phase_ends, self.out_dir / "loss.png", self._title())
        self._write_state("finished" if reason == "finished" else "stopped", reason)
        return DistillResult(self.student, self.out_dir, self.step, self.phase, reason, self.seconds, self.losses,
                             saved, self.resumed_from)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def _training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = self.pipe.load_dataset()
        if self.pipe.vae is not None:
            dataset = self.pipe.encode_dataset(dataset, seed=self.config.seed)
        if not hasattr(dataset, "images"):
            loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
            images, labels = next(iter(loader))
        else:
            images, labels = dataset.images, dataset.labels
        return images.to(self.device), torch.as_tensor(labels, dtype=torch.long).to(self.device)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        index = torch.randint(0, len(images), (self.config.batch_size,), generator=self.generator).to(self.device)
        x0, batch_labels = images[index], labels[index]
        kind, steps = self.phases[self.phase]
        low, high = self.config.guidance_scale_range
        if kind == "guided":
            scale = low + (high - low) * float(torch.rand(1, generator=self.generator))
            spec = self.student.config.guidance
            guider = plugins.create("guidance", spec.name, **{**spec.params, "scale": scale}).bind(self.pipe.schedule)
            loss = guided_eps_loss(self.model, self.teacher, guider, self.pipe.schedule, x0, batch_labels, scale,
                                   self.generator)
        else:
            loss = progressive_loss(self.model, self.phase_teacher, self.pipe.schedule, steps, x0, batch_labels,
                                    (low, high), self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach())

    def _phase_done(self) -> bool:
        if self.phase_step >= self.config.phase_iterations:
            return True
        minutes = self.config.max_minutes
        return minutes is not None and self.phase_seconds >= 60 * minutes / len(self.phases)

    def _end_phase(self) -> None:
        """Save the phase's student and its grid; the next phase's teacher is this student, frozen."""
        kind, steps = self.phases[self.phase]
        self._set_phase_sampler()
        self.model.eval()
        if kind == "halve":
            self.student.save_pretrained(self.out_dir / PHASES_DIR / f"steps-{steps}")
        self._save_grid(self.out_dir / "samples" / f"phase-{self.phase + 1}-{kind}-{steps}-steps.png", steps)
        self.phase_teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.train()
        self.phase_ends.append(self.step)
        self.phase, self.phase_step, self.phase_seconds = self.phase + 1, 0, 0.0
        self.optimizer = self._new_optimizer()
        plot_losses(self.losses, self.phase_ends, self.out_dir / "loss.png", self._title())

    def _save_grid(self, path: Path, steps: int) -> None:
        num_classes = self.model.num_classes
        rows = [self.student.generate(class_labels=list(range(num_classes)), guidance_scale=scale, seed=0,
                                      device=str(self.device)) for scale in GRID_SCALES]
        names = self.student.class_names or [str(label) for label in range(num_classes)]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_labeled_grid(torch.stack(rows), path, row_labels=[f"w = {scale:g}" for scale in GRID_SCALES],
                          column_labels=[str(name).split(" - ", 1)[-1] for name in names][:num_classes],
                          title=f"student after phase {self.phase + 1} ({steps} steps, one evaluation each), seed 0")

    def _title(self) -> str:
        phases = ", ".join(f"{kind} {steps}" for kind, steps in self.phases)
        return f"Distillation loss ({phases}): {self.step} steps"


def plot_losses(losses: list[float], phase_ends: list[int], path: Path, title: str) -> None:
    """The loss per step (log scale), a dotted line at the end of each phase; matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def write(tmp) -> None:
        figure = Figure(figsize=(8, 4), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        if losses:
            axes.plot(range(1, len(losses) + 1), losses, linewidth=0.7)
            axes.set_yscale("log")
        for end in phase_ends:
            axes.axvline(end, linestyle=":", color="grey")
        axes.set(title=title, xlabel="optimizer step", ylabel="loss (guided ε MSE, then truncated-SNR x̂0 MSE)")
        figure.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)


def distill(pipe, out_dir: str | Path, *, resume: bool = False, **options: Any) -> DistillResult:
    """``Pipeline.distill`` (its docstring is the documentation)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(DistillConfig)}
    if unknown:
        raise TypeError(f"distill() got unknown options {sorted(unknown)}; it takes "
                        f"{', '.join(f.name for f in dataclasses.fields(DistillConfig))}")
    return Distiller(pipe, Path(out_dir), DistillConfig(**options), resume=resume).run()
