"""Checkpoints of a training run: atomic directories of safetensors + JSON from which a run
resumes exactly where it stopped (same losses, same final weights, bit for bit on the CPU).

Layout of ``RUN_DIR/checkpoints/step-000123/`` (the step is zero-padded to six digits):

- ``model.safetensors``: the model's state dict;
- ``ema.safetensors``: the EMA model's state dict (only when the run keeps one);
- ``optimizer.safetensors``: every tensor of the optimizer state, named ``state.<param>.<key>``;
- ``trainer.safetensors``: ``data_order`` (the current epoch's permutation, absent between
  epochs), ``losses`` / ``epoch_losses`` (float64 history) and the RNG states ``rng.generator``
  (the trainer's torch.Generator), ``rng.torch``, ``rng.cuda.<i>``, ``rng.numpy``, ``rng.python``;
- ``trainer.json``, written last: step, epoch, position in the epoch, the optimizer's
  param groups, the LR scheduler and grad scaler states, the rest of the RNG states, the
  configs, and the byte size and SHA-256 of every file above.

A checkpoint is written into a hidden temporary directory, fsync'd, then renamed into place,
so ``step-…`` directories only ever appear complete. Loading re-checks every file against
``trainer.json`` and falls back to the previous checkpoint when one is damaged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from minild.training import checkpoint_state

if TYPE_CHECKING:
    from minild.training.trainer import Trainer

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "trainer.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is missing, partial, damaged, or does not fit the run resuming from it."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint: ``tensors[file stem][name]`` and the manifest ``state``."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return self.state["step"]


# -- discovery ----------------------------------------------------------------------


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Published checkpoint directories of a run, oldest step first (not yet verified)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(match[1]), path) for path in root.iterdir() if (match := _STEP_DIR.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def run_dir_of(path: str | Path) -> Path:
    """The run directory of ``path``, which is either a run directory or one of its checkpoints."""
    path = Path(path)
    return path.parent.parent if (path / MANIFEST_NAME).is_file() else path


def load_latest(path: str | Path) -> Checkpoint:
    """Load ``path`` if it is a checkpoint, else the newest complete checkpoint of the run
    directory ``path``. Damaged checkpoints are skipped with a warning."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return read_checkpoint(path)
    candidates = list_checkpoints(path)
    for candidate in reversed(candidates):
        try:
            return read_checkpoint(candidate)
        except CheckpointError as err:
            warnings.warn(f"skipping damaged checkpoint: {err}", stacklevel=2)
    where = path / CHECKPOINTS_DIR
    detail = f"none of its {len(candidates)} checkpoints is complete" if candidates else "it holds no checkpoint"
    raise FileNotFoundError(
        f"cannot resume from {path}: {detail} ({where}); train with the `checkpoint` hook in train.hooks to write them"
    )


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: Path) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints, never ``keep``; returns the deleted."""
    others = [path for path in list_checkpoints(run_dir) if path != keep]
    old = others[: max(len(others) - (keep_last - 1), 0)]
    for path in old:
        _remove_dir(path)
    return old


def remove_leftovers(run_dir: str | Path) -> None:
    """Delete the hidden directories of checkpoint writes or deletions that a crash interrupted."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-step-", ".old-step-", ".del-step-")):
                shutil.rmtree(path, ignore_errors=True)


def set_aside_newer(run_dir: str | Path, step: int) -> None:
    """Rename checkpoints newer than ``step`` (damaged ones, when resuming from ``step``) to
    ``step-….damaged``, so that a resumed run neither prunes its own new ones for them nor
    resumes from them later."""
    for path in list_checkpoints(run_dir):
        if int(_STEP_DIR.fullmatch(path.name)[1]) > step:
            os.rename(path, path.with_name(f"{path.name}.damaged-{uuid.uuid4().hex[:8]}"))


# -- reading and writing ------------------------------------------------------------


def write_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                     state: dict[str, Any]) -> Path:
    """Write ``tensors`` (file stem → name → tensor) and the JSON ``state`` as the checkpoint
    ``run_dir/checkpoints/step-…``, atomically; returns its path."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for stem, group in tensors.items():
            # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
            group = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in group.items()}
            data = save_safetensors(group)
            _write_synced(tmp / f"{stem}.safetensors", data)
            files[f"{stem}.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"format": FORMAT_VERSION, **state, "files": files}
        _write_synced(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1, allow_nan=False).encode())
        _fsync_dir(tmp)
        _publish(tmp, final)
    except OSError as err:  # a full disk, a quota, a lost mount: the earlier checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise type(err)(
            err.errno, f"cannot write the checkpoint {final.name} into {root} ({err.strerror or err}); its earlier "
            f"checkpoints are intact: free space and continue with `minild train CONFIG --resume {Path(run_dir)}`",
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint directory; raises ``CheckpointError`` if it is damaged."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {MANIFEST_NAME} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {MANIFEST_NAME} is not valid JSON ({err})") from None
    if not _is_manifest(manifest):
        raise CheckpointError(f"{path}: not a minild checkpoint of format {FORMAT_VERSION}")
    tensors = {}
    for name, expected in manifest["files"].items():
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{path}: {MANIFEST_NAME} lists {name!r}; a checkpoint holds only .safetensors files")
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(
                f"{path}: {name} is damaged ({len(data)} bytes, expected {expected['bytes']}, or its SHA-256 differs)"
            )
        try:
            tensors[name.removesuffix(".safetensors")] = load_safetensors(data)
        except SafetensorError as err:
            raise CheckpointError(f"{path}: {name} is not a safetensors file ({err})") from None
    return Checkpoint(path, tensors, manifest)


def _is_manifest(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        return False
    files = manifest.get("files")
    return isinstance(files, dict) and all(
        isinstance(entry, dict) and {"bytes", "sha256"} <= set(entry) for entry in files.values()
    )


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final``, replacing an older one of that name."""
    if final.exists():  # the same step saved again, e.g. after resuming from an earlier checkpoint
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        _remove_dir(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _remove_dir(path: Path) -> None:
    # Hide it first, so that a crash halfway through the deletion leaves no damaged step-… behind.
    hidden = path.with_name(f".del-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


# -- the trainer's state ------------------------------------------------------------


def save_checkpoint(trainer: "Trainer") -> Path:
    """Write a checkpoint of ``trainer`` into ``trainer.run_dir``; refuses non-finite weights."""
    model_state = trainer.model.state_dict()
    ema = trainer.pipeline.ema_model
    _check_finite(model_state, trainer.step)
    tensors = {"model": model_state}
    if ema is not None:
        tensors["ema"] = ema.state_dict()
    optimizer_tensors, optimizer_state = checkpoint_state.split_optimizer_state(trainer.optimizer.state_dict())
    tensors["optimizer"] = optimizer_tensors
    rng_tensors, rng_state = checkpoint_state.capture_rng(trainer.generator)
    history = {
        "losses": torch.tensor(trainer.losses, dtype=torch.float64),
        "epoch_losses": torch.tensor(trainer.epoch_losses, dtype=torch.float64),
    }
    if trainer.data_order is not None:
        history["data_order"] = trainer.data_order
    tensors["trainer"] = {**history, **{f"rng.{name}": tensor for name, tensor in rng_tensors.items()}}
    state = {
        "step": trainer.step,
        "epoch": trainer.epoch,
        "batches_done": trainer.batches_done,  # forward-pass batches of the current epoch already trained on
        "epoch_loss_sum": trainer.epoch_loss_sum,
        "seconds": trainer.trained_seconds,  # training time so far, which a resumed max_minutes budget counts
        "optimizer": optimizer_state,
        "scheduler": trainer.scheduler.state_dict(),
        "grad_scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": rng_state,
        "train": dataclasses.asdict(trainer.config),
        "pipeline": trainer.pipeline.config.to_dict(),
    }
    return write_checkpoint(trainer.run_dir, trainer.step, tensors, state)


def restore(trainer: "Trainer", checkpoint: Checkpoint) -> None:
    """Put ``trainer`` (set up for training, not yet started) in the checkpoint's state, all
    but the global RNGs (``restore_global_rng``, called just before the first step)."""
    state, tensors = checkpoint.state, checkpoint.tensors
    _warn_on_changed_data_stream(checkpoint, trainer)
    _load_module(trainer.model, tensors["model"], checkpoint.path / "model.safetensors")
    if "ema" in tensors:
        ema = copy.deepcopy(trainer.model).requires_grad_(False)  # same device and memory format
        _load_module(ema, tensors["ema"], checkpoint.path / "ema.safetensors")
        trainer.pipeline.ema_model = ema
    else:
        trainer.pipeline.ema_model = None
    trainer.optimizer.load_state_dict(checkpoint_state.join_optimizer_state(tensors["optimizer"], state["optimizer"]))
    checkpoint_state.match_param_layout(trainer.optimizer)
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None and state["grad_scaler"] is not None:
        trainer.scaler.load_state_dict(state["grad_scaler"])
    trainer.generator.set_state(tensors["trainer"]["rng.generator"])
    data_order = tensors["trainer"].get("data_order")
    if data_order is not None and len(data_order) != trainer.dataset_size:
        raise CheckpointError(
            f"{checkpoint.path}: its data order covers {len(data_order)} images but the dataset has "
            f"{trainer.dataset_size}: resume with the dataset the run was trained on"
        )
    trainer.data_order = None if data_order is None else data_order.to(trainer.generator.device)
    trainer.step, trainer.epoch = state["step"], state["epoch"]
    trainer.batches_done, trainer.epoch_loss_sum = state["batches_done"], state["epoch_loss_sum"]
    trainer.seconds_before = state.get("seconds", 0.0)  # absent in checkpoints of earlier versions
    trainer.losses = tensors["trainer"]["losses"].tolist()
    trainer.epoch_losses = tensors["trainer"]["epoch_losses"].tolist()


def restore_global_rng(checkpoint: Checkpoint) -> None:
    """Set the global torch (CPU, CUDA), numpy and python RNGs to the checkpoint's states."""
    checkpoint_state.restore_global_rng(checkpoint.tensors["trainer"], checkpoint.state["rng"])


def _check_finite(state: dict[str, torch.Tensor], step: int) -> None:
    floats = [tensor for tensor in state.values() if tensor.is_floating_point()]
    if floats and not torch.stack([tensor.isfinite().all() for tensor in floats]).all():
        raise CheckpointError(f"the model has NaN or inf weights after step {step}: not writing a checkpoint of them")


def _load_module(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    if set(state) != set(expected) or any(state[key].shape != expected[key].shape for key in expected):
        raise CheckpointError(
            f"{path} does not fit the configured {type(module).__name__}: the run was trained with another "
            f"model config; resume with the config it was trained with (recorded in {path.parent / MANIFEST_NAME})"
        )
    module.load_state_dict(state)  # copies into the existing tensors, keeping their memory format


def _warn_on_changed_data_stream(checkpoint: Checkpoint, trainer: "Trainer") -> None:
    saved = checkpoint.state["train"]
    current = dataclasses.asdict(trainer.config)
    keys = ("batch_size", "grad_accumulation_steps", "seed", "p_uncond")
    changed = [key for key in keys if saved[key] != current[key]]
    if changed:
        warnings.warn(
            f"resuming {checkpoint.path} with changed train.{', train.'.join(changed)}: training continues, "
            "but not as the original run would have", stacklevel=3,
        )
