"""Runs that survive Ctrl-C, kills and re-runs: the first SIGINT or SIGTERM stops after the step
with a checkpoint and the pipeline saved (exit 130), a second one aborts leaving only complete
files; time-interval checkpoints; a resumed time budget; and what a re-run into a run directory
that holds a run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

import minild
from minild.training import checkpoint, runs
from minild.cli import main
from minild_plugins.trainer_hooks import checkpointing
from tests.conftest import tiny_config
from tests.test_train import tiny_dataset

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


class SignalAtStep:
    """Sends this process ``signals`` at the end of step ``step``, as a Ctrl-C in a notebook would."""

    def __init__(self, step, *signals):
        self.step, self.signals = step, signals

    @minild.hookimpl
    def minild_train_step_end(self, step):
        if step == self.step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


def train_with(plugin, run_dir=None, **train):
    name = minild.register_plugin(plugin, name="test-signal")
    try:
        pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": 50, **train}))
        return pipe, pipe.train(tiny_dataset(64), run_dir=run_dir)
    finally:
        minild.unregister_plugin(name)


def handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def assert_only_complete_files(run_dir: Path):
    assert not [path for path in run_dir.rglob("*") if path.name.startswith(".")]  # no temporary names left
    for path in checkpoint.list_checkpoints(run_dir):
        checkpoint.read_checkpoint(path)
    if (run_dir / "model.safetensors").exists():
        minild.Pipeline.from_pretrained(run_dir)


# -- signals in the Python API ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_without_a_checkpoint_hook(tmp_path, signum):
    before = handlers()
    _, result = train_with(SignalAtStep(2, signum), tmp_path)
    assert result.interrupted and result.reason == f"interrupted ({signal.Signals(signum).name})"
    assert result.steps == 2 and len(result.losses) == 2
    assert result.checkpoint == tmp_path / "checkpoints" / "step-000002"
    assert checkpoint.read_checkpoint(result.checkpoint).step == 2
    assert runs.read_run(tmp_path).status == "interrupted"
    assert handlers() == before  # put back after fit()


def test_an_interrupt_with_the_checkpoint_hook_writes_one_checkpoint_of_the_last_step(tmp_path):
    _, result = train_with(SignalAtStep(3, signal.SIGINT), tmp_path, hooks=[{"name": "checkpoint", "every_steps": 2}])
    assert result.interrupted and result.steps == 3
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


def test_an_interrupt_without_a_run_dir_returns_the_trained_pipeline():
    pipe, result = train_with(SignalAtStep(2, signal.SIGINT))
    assert result.interrupted and result.steps == 2 and result.checkpoint is None
    assert pipe.generate(2, num_inference_steps=2, seed=0).shape == (2, 1, 28, 28)


def test_a_second_signal_aborts_at_once_and_leaves_only_complete_files(tmp_path):
    before = handlers()
    with pytest.raises(KeyboardInterrupt):
        train_with(SignalAtStep(2, signal.SIGINT, signal.SIGINT), tmp_path, hooks=["metrics_log", "checkpoint"])
    assert handlers() == before
    assert_only_complete_files(tmp_path)


def test_training_outside_the_main_thread_leaves_signals_alone():
    before, results = handlers(), []
    pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": 2}))
    worker = threading.Thread(target=lambda: results.append(pipe.train(tiny_dataset(64))))
    worker.start()
    worker.join()
    assert results[0].steps == 2 and not results[0].interrupted and handlers() == before


# -- signals to `minild train` ----------------------------------------------------------


def write_config(tmp_path: Path, **train) -> Path:
    hooks = [{"name": "metrics_log", "flush_every": 1}, {"name": "ema", "decay": 0.9}]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(train={"max_steps": 100_000, "hooks": hooks, **train})))
    return config


def wait_for_steps(run_dir: Path, child: subprocess.Popen, steps: int = 3, timeout: float = 60) -> None:
    """Until the run's metrics.jsonl (flushed every step) has ``steps`` records."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    child.kill()
    raise AssertionError(f"the run took no {steps} steps: {child.communicate()[1][-2000:]}")


def start_train(config: Path, run_dir: Path, *command: str) -> subprocess.Popen:
    command = command or ("-m", "minild.cli", "train", str(config), "--out", str(run_dir), "--grid", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_minild_train_stops_cleanly_on_a_signal_saves_everything_and_exits_130(tmp_path, signum, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    child = start_train(config, run_dir)
    try:
        wait_for_steps(run_dir, child)
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    assert f"stopped by interrupted ({signal.Signals(signum).name})" in out
    assert f"interrupted: saved checkpoint {newest} and the pipeline; continue with `minild train {config} " \
           f"--resume {run_dir}`" in out
    assert {"config.yaml", "model.safetensors", "ema.safetensors"} <= {path.name for path in run_dir.iterdir()}
    assert_only_complete_files(run_dir)
    step = checkpoint.read_checkpoint(newest).step
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == step  # the checkpoint is of the last step taken

    # The same command again continues the run, saying so, to a budget it then finishes.
    assert main(["train", str(config), "--out", str(run_dir), "--max-steps", str(step + 2), "--grid", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir} holds an unfinished run of this config: resuming it from {newest.name}" in out
    assert f"trained {step + 2} steps" in out and runs.read_run(run_dir).finished


# Stdout says when the run is in its end hooks and slows them down, so that a second SIGINT lands there.
SLOW_END = """
import sys, time
import minild
from minild.cli import main

class SlowEnd:
    @minild.hookimpl
    def minild_train_end(self):
        print("ending", flush=True)
        time.sleep(30)

minild.register_plugin(SlowEnd(), name="slow-end")
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sigint_aborts_minild_train_leaving_only_complete_files(tmp_path):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    child = start_train(config, run_dir, "-c", SLOW_END, "train", str(config), "--out", str(run_dir), "--grid", "0")
    try:
        wait_for_steps(run_dir, child)
        child.send_signal(signal.SIGINT)
        assert child.stdout.readline().strip() == "ending"
        started = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 130 and time.monotonic() - started < 10
    assert err.strip().endswith("minild: aborted") and "Traceback" not in err
    assert_only_complete_files(run_dir)


# -- checkpoints every N minutes, and a resumed time budget ---------------------------------


class Clock:
    """A stand-in for the checkpoint hook's clock, moved on by 30 s at every step's end."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    @minild.hookimpl
    def minild_train_step_end(self):
        self.now += 30.0


def test_checkpoint_every_minutes_counts_training_time(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(checkpointing, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    hooks = [{"name": "checkpoint", "every_epochs": None, "every_minutes": 1, "keep_last": None, "at_end": False}]
    train_with(clock, tmp_path, max_steps=7, hooks=hooks)
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == ["step-000002", "step-000004",
                                                                             "step-000006"]


def test_every_minutes_must_be_positive():
    with pytest.raises(ValueError, match="the 'checkpoint' trainer hook's every_minutes must be positive"):
        minild.create("hooks", "checkpoint", every_minutes=0)


def test_a_resumed_run_counts_the_time_trained_before_against_max_minutes(tmp_path):
    _, first = train_with(SignalAtStep(2, signal.SIGINT), tmp_path)
    manifest_path = first.checkpoint / checkpoint.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert 0 < manifest["seconds"] < 60
    manifest["seconds"] = 299.0  # as if it had trained 4 min 59 s before the kill
    manifest_path.write_text(json.dumps(manifest))
    pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": None, "max_minutes": 5}))
    result = pipe.train(tiny_dataset(64), resume=tmp_path)
    assert result.reason == "max_minutes" and result.trained_seconds >= 300
    assert 2 < result.steps < 1000  # a second of training, not five minutes


# -- re-running into a run directory ------------------------------------------------------


def cli_train(config, run_dir, *flags, max_steps=2):
    return main(["train", str(config), "--out", str(run_dir), "--max-steps", str(max_steps), "--grid", "0", *flags])


def test_rerunning_a_finished_run_trains_nothing_and_succeeds(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert cli_train(config, run_dir) == 0
    weights = (run_dir / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli_train(config, run_dir) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{run_dir} already holds a finished run of this config: nothing to train (`--overwrite` trains it again, "
        f"`--resume {run_dir}` with a larger --max-minutes or --max-steps trains it further)"
    ]
    assert (run_dir / "model.safetensors").read_bytes() == weights


def test_a_run_of_another_config_is_refused_naming_resume_and_overwrite(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert cli_train(config, run_dir) == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_config(train={"lr": 0.01, "max_steps": 2})))
    capsys.readouterr()
    assert cli_train(other, run_dir) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} holds a finished run (2 steps) of another config (it differs in train): continue it with " \
           f"`minild train ITS_CONFIG --resume {run_dir}`, start over with `--overwrite`" in err
    assert cli_train(other, run_dir, "--overwrite", max_steps=3) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert runs.read_run(run_dir).config == runs.comparable_config(minild.Pipeline.from_config(other).config)


def test_a_run_killed_between_its_last_step_and_saving_the_pipeline_is_resumed_and_saved(tmp_path, capsys):
    config, run_dir = write_config(tmp_path, hooks=["checkpoint"]), tmp_path / "run"
    minild.Pipeline.from_config(config).train(run_dir=run_dir, max_steps=2)  # no save_pretrained
    assert runs.read_run(run_dir).status == "unsaved"
    assert cli_train(config, run_dir) == 0
    out = capsys.readouterr().out
    assert "resuming it from step-000002" in out and "trained 2 steps" in out  # no step more
    assert runs.read_run(run_dir).finished and (run_dir / "model.safetensors").is_file()


def test_an_unfinished_run_without_a_checkpoint_starts_over(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    run_dir.mkdir()
    pipe = minild.Pipeline.from_config(config)
    runs.write_run_state(run_dir, pipe.config, status="running", step=7, reason=None, trained_seconds=3.0)
    (run_dir / "metrics.jsonl").write_text('{"event": "step", "step": 7}\n')  # killed before its first checkpoint
    assert cli_train(config, run_dir) == 0
    out = capsys.readouterr().out
    assert f"{run_dir} holds an unfinished run of this config without a checkpoint: starting it over" in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    run_dir.mkdir()
    pipe = minild.Pipeline.from_config(config)
    runs.write_run_state(run_dir, pipe.config, status="running", step=7, reason=None, trained_seconds=3.0)
    assert main(["train", str(config), "--resume", str(run_dir), "--max-steps", "2", "--grid", "0"]) == 0
    assert "without a checkpoint: starting it over" in capsys.readouterr().out
    assert (run_dir / "model.safetensors").is_file()


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli_train(config, tmp_path / "run", "--overwrite", "--resume", str(tmp_path / "run")) == 2
    assert "--overwrite and --resume exclude each other" in capsys.readouterr().err
