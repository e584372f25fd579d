"""Run directories: what one holds (``run.json``: the config it was started with, its status and
step) and what a new run into it does — start, resume, nothing, or refuse — so that two runs
never mix in one directory."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from minild.training import checkpoint
from minild.config import PipelineConfig
from minild.training.interrupts import is_interrupt
from minild.io import atomic_write

RUN_STATE_NAME = "run.json"
# What training a run writes into its directory (and the experiments scoring it): `overwrite`
# deletes these and nothing else.
RUN_FILES = ("config.yaml", "model.safetensors", "ema.safetensors", "metrics.jsonl", "metrics.csv", "loss.png",
             "samples.png")
RUN_DIRS = ("checkpoints", "samples", "tensorboard", "vae", "cfg_digits", "prompt_digits")
FINISHED_REASONS = ("max_steps", "epochs", "max_minutes")


class RunDirError(ValueError):
    """A run directory holds another run than the one asked for."""


@dataclass
class RunInfo:
    """What a run directory holds. ``status``: ``"running"`` (or killed), ``"interrupted"``,
    ``"stopped"`` (e.g. a non-finite loss), ``"finished"`` (a budget ran out and the pipeline
    was saved: ``mark_saved``) or ``"unsaved"`` (a budget ran out, the pipeline not saved
    since: resuming it stops at once and saves it)."""

    status: str
    config: dict[str, Any] | None  # the pipeline config it was started with, as comparable_config gives it
    step: int | None
    checkpoint: Path | None  # its newest checkpoint directory (not verified)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def describe(self) -> str:
        if self.status in ("finished", "unsaved"):
            return "a finished run" + (f" ({self.step} steps)" if self.step is not None else "")
        newest = f"newest checkpoint {self.checkpoint.name}" if self.checkpoint is not None else "no checkpoint"
        return f"an unfinished run ({newest})"


@dataclass
class RunPlan:
    """What ``minild train CONFIG --out RUN`` does with ``RUN``: ``start`` a new run (after
    deleting the files of an unfinished one without a checkpoint, when ``overwrite``), ``resume``
    the unfinished run of the same config, or nothing (``done``: it finished). ``message``:
    one line for the user, None for a plain start."""

    action: Literal["start", "resume", "done"]
    message: str | None = None
    overwrite: bool = False


def comparable_config(config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as plain JSON data, without the image shape (filled in by training)."""
    data = config.to_dict() if isinstance(config, PipelineConfig) else dict(config)
    data.pop("image_shape", None)
    return json.loads(json.dumps(data))


def read_run(run_dir: str | Path) -> RunInfo | None:
    """What ``run_dir`` holds: a run (``run.json``), a run of an older minild (checkpoints), a
    saved pipeline (``config.yaml`` + weights, taken as finished), or None (nothing of a run)."""
    run_dir = Path(run_dir)
    checkpoints = checkpoint.list_checkpoints(run_dir)
    newest = checkpoints[-1] if checkpoints else None
    state_path = run_dir / RUN_STATE_NAME
    if state_path.is_file():
        state = _read_json(state_path)
        status = state.get("status", "running")
        if status == "finished" and state.get("saved_step") != state.get("step"):
            status = "unsaved"
        return RunInfo(status, state.get("config"), state.get("step"), newest)
    if newest is not None:
        manifest = _read_json(newest / checkpoint.MANIFEST_NAME)
        config = manifest.get("pipeline")
        return RunInfo("running", comparable_config(config) if config else None, manifest.get("step"), newest)
    if (run_dir / "config.yaml").is_file() and (run_dir / "model.safetensors").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            config = None
        return RunInfo("finished", comparable_config(config) if isinstance(config, dict) else None, None, None)
    return None


def write_run_state(run_dir: str | Path, config: PipelineConfig, *, status: str, step: int, reason: str | None,
                    trained_seconds: float) -> None:
    state = {"status": status, "step": step, "reason": reason, "trained_seconds": round(trained_seconds, 3),
             "config": comparable_config(config)}
    _write_json(Path(run_dir) / RUN_STATE_NAME, state)


def mark_saved(run_dir: str | Path) -> None:
    """Record in ``run.json`` that the pipeline of the run's last step is saved in ``run_dir``
    (``minild train`` calls it after ``save_pretrained``): only then is a finished run finished."""
    path = Path(run_dir) / RUN_STATE_NAME
    state = _read_json(path)
    if state:
        state["saved_step"] = state.get("step")
        _write_json(path, state)


def run_status(reason: str | None) -> str:
    if reason in FINISHED_REASONS:
        return "finished"
    return "interrupted" if is_interrupt(reason) else "stopped"


def check_fresh(run_dir: str | Path) -> None:
    """Refuse to start a new run in ``run_dir`` when it holds one (see ``read_run``)."""
    info = read_run(run_dir)
    if info is not None:
        raise RunDirError(
            f"{run_dir} already holds {info.describe()}: continue it with resume={str(run_dir)!r} "
            f"(`--resume {run_dir}`), start over with overwrite=True (`--overwrite`: deletes that run), "
            "or train into another run directory"
        )


def plan_run(run_dir: str | Path, config: PipelineConfig) -> RunPlan:
    """Decide what a new run of ``config`` into ``run_dir`` does (see ``RunPlan``); raises
    ``RunDirError`` when ``run_dir`` holds a run of another config."""
    info = read_run(run_dir)
    if info is None:
        return RunPlan("start")
    wanted = comparable_config(config)
    if info.config != wanted:
        differ = [key for key in wanted if info.config is None or info.config.get(key) != wanted[key]]
        which = f"another config (it differs in {', '.join(differ)})" if info.config is not None else "an unknown config"
        raise RunDirError(
            f"{run_dir} holds {info.describe()} of {which}: continue it with `minild train ITS_CONFIG --resume "
            f"{run_dir}`, start over with `--overwrite` (deletes that run), or choose another --out"
        )
    if info.finished:
        return RunPlan("done", f"{run_dir} already holds a finished run of this config: nothing to train "
                               f"(`--overwrite` trains it again, `--resume {run_dir}` with a larger "
                               "--max-minutes or --max-steps trains it further)")
    if info.checkpoint is not None:
        return RunPlan("resume", f"{run_dir} holds an unfinished run of this config: resuming it from "
                                 f"{info.checkpoint.name} (`--overwrite` starts over)")
    return RunPlan("start", f"{run_dir} holds an unfinished run of this config without a checkpoint: starting it over",
                   overwrite=True)


def clear_run(run_dir: str | Path) -> None:
    """Delete what a run wrote into ``run_dir`` (``RUN_FILES``, ``RUN_DIRS``, ``run.json`` last);
    anything else in it stays."""
    run_dir = Path(run_dir)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (*RUN_FILES, RUN_STATE_NAME):
        (run_dir / name).unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
