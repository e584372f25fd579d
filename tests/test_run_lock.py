"""One writer per run directory: a second `minild train`, `minild train-vae` or
`Pipeline.train(run_dir=...)` into a directory another process writes is refused before it touches
anything, naming the holder; a SIGKILLed writer does not block `--resume`; readers need no lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import minild
from minild.training import lock, runs
from minild.cli import main
from tests.test_runs import REPO, cli_train, start_train, wait_for_steps, write_config
from tests.test_train import tiny_dataset
from tests.test_vaes import TINY_DIGITS_VAE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py

HOLDER = "import sys; from minild.training import lock; lock.acquire(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


@contextlib.contextmanager
def held_by_another_process(run_dir: Path):
    """A process that holds ``run_dir``'s lock, as a training run does, until the block ends."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.kill()
        child.wait()


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` (itself included) with its mtime and size."""
    return {str(path.relative_to(directory)): (path.stat().st_mtime_ns, path.stat().st_size)
            for path in [directory, *directory.rglob("*")]}


def refusal(run_dir: Path, holder: subprocess.Popen) -> str:
    return f"{run_dir} is being written by process {holder.pid} on {socket.gethostname()} since "


def test_a_second_minild_train_fails_naming_the_holder_and_touches_nothing(tmp_path):
    config, run_dir = write_config(tmp_path, hooks=["checkpoint"]), tmp_path / "run"
    minild.Pipeline.from_config(config).train(run_dir=run_dir, max_steps=2)  # an unfinished run with a checkpoint
    with held_by_another_process(run_dir) as holder:
        before = snapshot(run_dir)
        second = subprocess.run([sys.executable, "-m", "minild.cli", "train", str(config), "--out", str(run_dir),
                                 "--max-steps", "4", "--grid", "0"], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert snapshot(run_dir) == before
    assert second.returncode == 2 and second.stdout == ""
    [line] = second.stderr.splitlines()
    assert line.startswith(f"minild: error: {refusal(run_dir, holder)}")
    assert "one writer at a time" in line and "--resume" in line and "needs no lock" in line


def test_pipeline_train_into_a_held_run_dir_is_refused_before_it_writes(tmp_path):
    run_dir = tmp_path / "run"
    pipe = minild.Pipeline.from_config(write_config(tmp_path, hooks=["checkpoint"]))
    with held_by_another_process(run_dir) as holder:
        before = snapshot(run_dir)
        with pytest.raises(lock.RunLockedError, match=refusal(run_dir, holder)):
            pipe.train(tiny_dataset(32), run_dir=run_dir, max_steps=1)
        assert snapshot(run_dir) == before
    pipe.train(tiny_dataset(32), run_dir=run_dir, max_steps=1)  # free again once the holder is gone
    assert runs.read_run(run_dir).step == 1
    assert not (run_dir / lock.LOCK_NAME).exists()  # released, and removed, when training returns
    with held_by_another_process(run_dir) as holder:  # resume= alone names the run directory too
        with pytest.raises(lock.RunLockedError, match=refusal(run_dir, holder)):
            pipe.train(tiny_dataset(32), resume=run_dir, max_steps=2)


def test_a_second_train_vae_fails_naming_the_holder_and_touches_nothing(tmp_path, capsys):
    config, out = tmp_path / "vae.yaml", tmp_path / "vae"
    config.write_text(json.dumps({"vae": {"name": "digits_vae", **TINY_DIGITS_VAE},
                                  "data": {"dataset": "digits", "split": "test"},
                                  "train": {"batch_size": 32, "max_steps": 1, "device": "cpu"}}))
    with held_by_another_process(out) as holder:
        before = snapshot(out)
        assert main(["train-vae", str(config), "--out", str(out)]) == 2
        assert snapshot(out) == before
    assert refusal(out, holder) in capsys.readouterr().err


def test_a_sigkilled_writer_does_not_block_resume(tmp_path, capsys):
    hooks = [{"name": "metrics_log", "flush_every": 1}, {"name": "checkpoint", "every_steps": 2}]
    config, run_dir = write_config(tmp_path, hooks=hooks), tmp_path / "run"
    child = start_train(config, run_dir)
    try:
        wait_for_steps(run_dir, child)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
    assert lock.read_holder(run_dir)["pid"] == child.pid  # left behind, naming a dead process
    assert main(["train", str(config), "--resume", str(run_dir), "--max-steps", "6", "--grid", "0"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    assert runs.read_run(run_dir).finished and not (run_dir / lock.LOCK_NAME).exists()


def test_readers_work_while_a_writer_holds_the_run_dir(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert cli_train(config, run_dir) == 0
    with held_by_another_process(run_dir):
        assert minild.Pipeline.from_pretrained(run_dir).generate(2, num_inference_steps=2, seed=0).shape[0] == 2
        grid = tmp_path / "grid.png"
        assert main(["sample", str(run_dir), "--num", "2", "--steps", "2", "--out", str(grid)]) == 0
        assert grid.is_file()


def test_the_holding_thread_may_lock_again_and_another_thread_may_not(tmp_path):
    run_dir = tmp_path / "run"
    with lock.hold(run_dir), lock.hold(run_dir):  # the CLI around Pipeline.train does this
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_refusal_in_thread(run_dir)))
        thread.start()
        thread.join()
        assert errors == [True]
        assert lock.read_holder(run_dir)["pid"] == os.getpid()
    assert not (run_dir / lock.LOCK_NAME).exists()
    with lock.hold(run_dir):  # free again
        pass


def _refusal_in_thread(run_dir: Path) -> bool:
    try:
        lock.acquire(run_dir)
    except lock.RunLockedError as err:
        return f"process {os.getpid()}" in str(err)
    return False


def test_other_processes_of_a_multi_process_run_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it: only rank 0 writes the run directory
    with held_by_another_process(tmp_path / "run"):
        with lock.hold(tmp_path / "run") as held:
            assert held is None
