"""Weights on disk: safetensors only (no pickle), written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class UnwritableDirectoryError(OSError):
    """An output directory cannot be created or written to."""


def check_writable_dir(path: str | Path, what: str = "output directory") -> None:
    """Create ``path`` if needed and write (then delete) a file in it, so that a long run
    fails at its start rather than when it saves its results."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UnwritableDirectoryError(
            f"cannot write to the {what} {path} ({err.strerror or err}): choose another one "
            "(e.g. --out DIR) or make it writable"
        ) from err


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_files(directory: str | Path, write) -> None:
    """Call ``write(tmp_dir)`` then move each file it wrote into ``directory`` by a rename, so that
    a library's ``save_pretrained`` (several files, written in place) leaves no partial file either."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as tmp:
        write(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            target = directory / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load weights saved by ``save_weights``; every key must match (strict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist: point at the directory a pipeline was saved to, "
            "or save it again with Pipeline.save_pretrained"
        )
    try:
        state = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or damaged; "
            "save the pipeline again or restore the file from a copy"
        ) from None
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    resized = [
        f"{key} {tuple(state[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if missing or unexpected or resized:
        raise ValueError(
            f"{path} does not fit the configured {type(module).__name__}: "
            f"missing keys {_first(missing)}, unexpected keys {_first(unexpected)}, "
            f"shape mismatches (saved vs configured) {_first(resized)}; "
            "was it saved from a pipeline with a different model config?"
        )
    module.load_state_dict(state)


def _first(items: list[str], n: int = 3) -> str:
    return "[" + ", ".join(items[:n]) + (", …" if len(items) > n else "") + "]"
