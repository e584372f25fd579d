"""Checkpoints: layout, atomic writes, damaged ones skipped, and exact resume (same losses,
same final weights) after a stop mid-epoch, at an epoch's last step, a SIGKILL mid-step or
mid-write, or a disk that fills up during a write."""

from __future__ import annotations

import errno
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import minild
from minild.training import checkpoint
from minild import io as minild_io
from minild.cli import main
from tests.conftest import tiny_config
from tests.test_train import tiny_dataset

REPO = Path(__file__).resolve().parent.parent
STEPS = 10

# 64 images in batches of 8, two per optimizer step: 4 steps per epoch. Class labels with
# condition dropout, warm-up + cosine decay, EMA, channels_last (the default): everything
# that has state a resume must restore.
RESUME_TRAIN = {
    "batch_size": 8, "grad_accumulation_steps": 2, "lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 3,
    "p_uncond": 0.25, "max_steps": STEPS, "channels_last": True,
    "hooks": [{"name": "ema", "decay": 0.9}, {"name": "checkpoint", "every_steps": 2, "keep_last": 2}, "metrics_log"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py



def resume_config(**train):
    return tiny_config(model={"num_classes": 10}, train={**RESUME_TRAIN, **train})


def run(run_dir, *, resume=None, **train):
    pipe = minild.Pipeline.from_config(resume_config(**train))
    return pipe, pipe.train(tiny_dataset(64), run_dir=run_dir, resume=resume)


class StopAfterCheckpoint:
    """Stops the run right after the checkpoint of step ``step`` is written (a preemption)."""

    def __init__(self, step):
        self.step = step

    @minild.hookimpl
    def minild_checkpoint_saved(self, trainer, step):
        if step == self.step:
            trainer.request_stop("preempted")


def run_stopped_at(run_dir, step):
    name = minild.register_plugin(StopAfterCheckpoint(step), name="test-stop-after-checkpoint")
    try:
        return run(run_dir)
    finally:
        minild.unregister_plugin(name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("uninterrupted"))


def assert_same_run(resumed, uninterrupted, run_dir):
    (pipe, result), (expected_pipe, expected) = resumed, uninterrupted
    assert result.steps == expected.steps == STEPS
    assert result.losses == expected.losses
    assert result.epoch_losses == expected.epoch_losses
    for name, tensor in expected_pipe.model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[name], tensor), name
    for name, tensor in expected_pipe.ema_model.state_dict().items():
        assert torch.equal(pipe.ema_model.state_dict()[name], tensor), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if record["event"] == "step"]  # none twice, none lost
    assert [(r["step"], r["loss"]) for r in steps] == list(zip(range(1, STEPS + 1), expected.losses))


def assert_every_checkpoint_loads(run_dir):
    """The run directory holds no checkpoint that fails to load."""
    paths = checkpoint.list_checkpoints(run_dir)
    for path in paths:
        checkpoint.read_checkpoint(path)  # raises CheckpointError on a damaged one
    return [path.name for path in paths]


# Step 6 is mid-epoch (the 2nd of epoch 2's 4 steps); step 4 is epoch 1's last step, stopped
# before its epoch end ran, so the resumed run finishes that epoch first.
@pytest.mark.parametrize("stop_step", [6, 4])
def test_resumed_run_has_the_uninterrupted_losses_and_weights(tmp_path, uninterrupted, stop_step):
    _, stopped = run_stopped_at(tmp_path, stop_step)
    assert stopped.steps == stop_step and stopped.reason == "preempted"
    assert stopped.losses == uninterrupted[1].losses[:stop_step]

    resumed = run(None, resume=tmp_path)  # a fresh pipeline, as after a restart
    assert resumed[1].resumed_from == tmp_path / "checkpoints" / f"step-{stop_step:06d}"
    assert resumed[1].losses[stop_step:] == uninterrupted[1].losses[stop_step:]
    assert_same_run(resumed, uninterrupted, tmp_path)


def test_checkpoint_layout_and_manifest(tmp_path):
    run(tmp_path, max_steps=None, epochs=1)
    steps = [path.name for path in checkpoint.list_checkpoints(tmp_path)]
    assert steps == ["step-000002", "step-000004"]  # keep_last: 2 (step 4's epoch-end save replaced its step save)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == steps  # no temporary leftovers
    newest = tmp_path / "checkpoints" / "step-000004"
    files = {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer.safetensors", "trainer.json"}
    assert {path.name for path in newest.iterdir()} == files
    manifest = json.loads((newest / "trainer.json").read_text())
    assert (manifest["step"], manifest["epoch"], manifest["batches_done"]) == (4, 1, 0)
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == entry["sha256"]
    tensors = checkpoint.read_checkpoint(newest).tensors
    assert {"rng.generator", "rng.torch", "rng.numpy", "rng.python", "losses"} <= set(tensors["trainer"])
    assert "data_order" not in tensors["trainer"]  # between epochs: the next permutation is not drawn yet
    assert any(name.endswith(".exp_avg_sq") for name in tensors["optimizer"])


def test_truncated_checkpoint_is_never_loaded_the_previous_one_is(tmp_path):
    run_stopped_at(tmp_path, 6)
    newest = tmp_path / "checkpoints" / "step-000006"
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is damaged"):
        checkpoint.read_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert checkpoint.load_latest(tmp_path).step == 4


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume from .*: it holds no checkpoint"):
        run(None, resume=tmp_path)


def test_a_fresh_run_refuses_a_run_dir_that_holds_a_run_and_overwrite_starts_over(tmp_path):
    run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"already holds a finished run \(2 steps\): continue it with resume=.* "
                                         r"start over with overwrite=True \(`--overwrite`: deletes that run\)"):
        run(tmp_path, max_steps=2)
    (tmp_path / "notes.txt").write_text("mine")
    pipe = minild.Pipeline.from_config(resume_config(max_steps=4))
    result = pipe.train(tiny_dataset(64), run_dir=tmp_path, overwrite=True)
    assert result.resumed_from is None and result.steps == 4
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4]  # nothing of the old run
    assert (tmp_path / "notes.txt").read_text() == "mine"  # what is not the run's stays


# The child trains with a checkpoint every 2 steps and SIGKILLs itself halfway through
# writing the model file of step 8's checkpoint.
KILLED_DURING_WRITE = """
import os, signal, sys
import torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from minild.training import checkpoint
from tests.test_checkpoint import run

write = checkpoint._write_synced

def write_then_die(path, data):
    if path.parent.name.startswith(".tmp-step-000008") and path.name == "model.safetensors":
        path.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)

checkpoint._write_synced = write_then_die
run({run_dir!r})
"""


def test_run_killed_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, uninterrupted):
    script = KILLED_DURING_WRITE.format(repo=str(REPO), threads=torch.get_num_threads(), run_dir=str(tmp_path))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = [path.name for path in (tmp_path / "checkpoints").iterdir()]
    assert any(name.startswith(".tmp-step-000008") for name in leftovers)
    assert assert_every_checkpoint_loads(tmp_path) == ["step-000004", "step-000006"]

    resumed = run(None, resume=tmp_path)
    assert resumed[1].resumed_from.name == "step-000006"
    assert_same_run(resumed, uninterrupted, tmp_path)
    assert not any(path.name.startswith(".") for path in (tmp_path / "checkpoints").iterdir())


def test_cli_resume_continues_the_run(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(train={"hooks": [{"name": "checkpoint", "every_steps": 2}]})))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run_dir), "--max-steps", "3", "--grid", "0"]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--resume", str(run_dir), "--max-steps", "5", "--grid", "0"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000003'}" in out and "trained 5 steps" in out
    assert (run_dir / "model.safetensors").is_file()


# The child trains with a checkpoint every 2 steps. In step 7, with the gradients computed but
# not yet applied, it says so and waits; the parent then SIGKILLs it from outside.
KILLED_MID_STEP = """
import sys, time
import torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
import minild
from tests.test_checkpoint import run

class PauseInStep7:
    @minild.hookimpl
    def minild_train_start(self, trainer):
        optimizer_step = trainer.optimizer.step

        def step(*args, **kwargs):
            if trainer.step == 6:
                print("in step 7", flush=True)
                time.sleep(600)
            return optimizer_step(*args, **kwargs)

        trainer.optimizer.step = step

minild.register_plugin(PauseInStep7(), name="pause-in-step-7")
run({run_dir!r})
"""


def test_run_killed_in_the_middle_of_a_training_step_resumes_from_the_last_complete_checkpoint(tmp_path, uninterrupted):
    script = KILLED_MID_STEP.format(repo=str(REPO), threads=torch.get_num_threads(), run_dir=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "in step 7", child.stderr.read()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    assert assert_every_checkpoint_loads(tmp_path) == ["step-000004", "step-000006"]
    assert not any(path.name.startswith(".") for path in (tmp_path / "checkpoints").iterdir())

    resumed = run(None, resume=tmp_path)
    assert resumed[1].resumed_from.name == "step-000006"
    assert_same_run(resumed, uninterrupted, tmp_path)


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_ones_and_resume_works(tmp_path, uninterrupted,
                                                                                      monkeypatch):
    write = checkpoint._write_synced

    def write_until_full(path, data):
        if path.parent.name.startswith(".tmp-step-000008") and path.name == "optimizer.safetensors":
            path.write_bytes(data[:100])  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", write_until_full)
    with pytest.raises(OSError, match=r"cannot write the checkpoint step-000008 into .*No space left on device.*"
                                      r"earlier checkpoints are intact: free space and continue with .*--resume") as err:
        run(tmp_path)
    assert err.value.errno == errno.ENOSPC
    assert assert_every_checkpoint_loads(tmp_path) == ["step-000004", "step-000006"]
    assert not any(path.name.startswith(".") for path in (tmp_path / "checkpoints").iterdir())

    monkeypatch.setattr(checkpoint, "_write_synced", write)  # space freed
    resumed = run(None, resume=tmp_path)
    assert resumed[1].resumed_from.name == "step-000006"
    assert_same_run(resumed, uninterrupted, tmp_path)


def test_disk_full_while_saving_a_pipeline_keeps_the_previous_weights(tmp_path, monkeypatch):
    old = minild.Pipeline.from_config(resume_config())
    old.save_pretrained(tmp_path)
    new = minild.Pipeline.from_config(resume_config())
    torch.nn.init.zeros_(next(new.model.parameters()))  # other weights, to be saved over the old ones

    def save_until_full(tensors, path):
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(minild_io, "save_file", save_until_full)
    with pytest.raises(OSError, match="No space left on device"):
        new.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml", "model.safetensors"]  # no temp files
    reloaded = minild.Pipeline.from_pretrained(tmp_path)
    for name, tensor in old.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[name], tensor), name
