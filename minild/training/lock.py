"""One writer per run directory: an exclusive OS lock on ``RUN/.lock`` for as long as a training
run writes ``RUN``, and the holder's pid, host and start time in that file for the refusal message.

The kernel drops the lock when its process dies (even by SIGKILL), so a killed run leaves at most
a ``.lock`` naming a dead process, which does not block the next writer. Readers take no lock:
every file in a run directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

from minild.io import UnwritableDirectoryError

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range locks, also released when the process dies
    fcntl = None
    import msvcrt

LOCK_NAME = ".lock"
# On Windows a locked byte cannot be read by others: lock one far past the holder's JSON.
_WINDOWS_LOCK_OFFSET = 1 << 20


class RunLockedError(ValueError):
    """Another process (or thread) is writing the run directory."""


class RunLock:
    """The lock this process holds on one run directory; ``release`` it once per ``acquire``."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.path, self._fd = run_dir, run_dir / LOCK_NAME, fd
        self._owner = threading.get_ident()
        self._holds = 1

    def release(self) -> None:
        with _registry_lock:
            if self._holds == 0:
                return
            self._holds -= 1
            if self._holds:
                return
            _held.pop(_key(self.run_dir), None)
            # Deleted while still locked: a process that opened this file meanwhile finds, once it
            # gets the lock, that the path no longer names it, and starts again (see _open_locked).
            with contextlib.suppress(OSError):
                self.path.unlink()
            _unlock(self._fd)
            os.close(self._fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


_registry_lock = threading.Lock()
_held: dict[str, RunLock] = {}  # resolved run directory -> the lock this process holds on it


def acquire(run_dir: str | Path) -> RunLock:
    """Lock ``run_dir`` (created if missing) for writing, or raise ``RunLockedError`` naming the
    holder, having changed nothing in it. The thread that holds it may acquire it again (each
    ``acquire`` needs its ``release``): the CLI holds it around ``Pipeline.train``, which takes it too."""
    run_dir = Path(run_dir)
    with _registry_lock:
        held = _held.get(_key(run_dir))
        if held is not None:
            if held._owner != threading.get_ident():
                raise RunLockedError(_locked_message(run_dir, read_holder(run_dir)))
            held._holds += 1
            return held
        fd = _open_locked(run_dir)
        try:
            _write_holder(fd)
        except BaseException:  # e.g. a full disk: give the lock back rather than keep it unnamed
            _unlock(fd)
            os.close(fd)
            raise
        lock = _held[_key(run_dir)] = RunLock(run_dir, fd)
        return lock


@contextlib.contextmanager
def hold(run_dir: str | Path | None) -> Iterator[RunLock | None]:
    """``with hold(run_dir):`` the lock for the block. Nothing for ``None``, nor on the other
    processes of an ``accelerate launch`` or torchrun run: only the main one (``RANK`` 0) writes,
    and if another writer refuses it, the launcher stops the rest when it exits."""
    if run_dir is None or not is_main_process():
        yield None
        return
    lock = acquire(run_dir)
    try:
        yield lock
    finally:
        lock.release()


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun and accelerate launch set RANK per process


def read_holder(run_dir: str | Path) -> dict:
    """What ``RUN/.lock`` says of its holder (``pid``, ``host``, ``since``, ``command``); ``{}``
    when there is none or it is being written. Whether it still holds the lock, only ``acquire`` knows."""
    try:
        data = json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _open_locked(run_dir: Path) -> int:
    path = run_dir / LOCK_NAME
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # No O_TRUNC: a refused writer must leave the holder's file as it is.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UnwritableDirectoryError(
                f"cannot write to the run directory {run_dir} ({err.strerror or err}): choose another one "
                "(e.g. --out DIR) or make it writable"
            ) from err
        if not _try_lock(fd):
            os.close(fd)
            raise RunLockedError(_locked_message(run_dir, read_holder(run_dir)))
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        _unlock(fd)  # its holder released it and deleted it between our open and our lock
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError from flock, PermissionError from msvcrt
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _write_holder(fd: int) -> None:
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None}
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)  # a killed holder's JSON may be there
    os.lseek(fd, 0, os.SEEK_SET)
    while data:
        data = data[os.write(fd, data):]


def _locked_message(run_dir: Path, holder: dict) -> str:
    if holder.get("pid") is not None:
        host = holder.get("host", "an unknown host")
        command = f" (`{holder['command']}`)" if holder.get("command") else ""
        who = f"process {holder['pid']} on {host} since {holder.get('since', '?')}{command}"
        stop = f"stop it (Ctrl-C where it runs, or `kill {holder['pid']}` on {host})"
    else:
        who, stop = "another process (still writing its details into .lock)", "stop it"
    return (
        f"{run_dir} is being written by {who}: a run directory takes one writer at a time. Wait for it "
        f"to finish or {stop}, then run again (`--resume` continues an unfinished run), or write into another "
        "directory (--out); reading it (minild sample, minild experiment, Pipeline.from_pretrained) needs no lock"
    )
