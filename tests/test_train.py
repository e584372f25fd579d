"""The trainer: LR schedule, gradient accumulation, precision, NaN stop, config checks, and the
built-in and third-party trainer hooks."""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import minild
from minild import plugins
from minild.training.checkpoint import list_checkpoints, read_checkpoint
from minild.config import ConfigError, load_config
from minild.data import ImageTensorDataset, load_dataset
from minild.training.step import loss_weights
from minild.training.trainer import lr_factor
from tests.conftest import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py



@functools.lru_cache
def _digits():
    return load_dataset("digits", split="test")


def tiny_dataset(num_images: int = 64) -> ImageTensorDataset:
    """The first ``num_images`` held-out digits: a few batches per epoch."""
    digits = _digits()
    return ImageTensorDataset(digits.images[:num_images], digits.labels[:num_images], digits.class_names)


class Recorder:
    """A trainer hook plugin defined in a test: records what it is called with."""

    def __init__(self):
        self.lrs, self.batch_sizes, self.training, self.images = [], [], [], []

    @minild.hookimpl
    def minild_train_step_end(self, trainer, lr, batch_size):
        self.lrs.append(lr)
        self.batch_sizes.append(batch_size)
        self.training.append(trainer.model.training)

    @minild.hookimpl
    def minild_samples_saved(self, path, step, images):
        self.images.append((step, path, images))


@pytest.fixture
def recorder():
    hook = Recorder()
    name = minild.register_plugin(hook, name="test-recorder")
    yield hook
    minild.unregister_plugin(name)


def train(config_overrides=None, dataset_size=64, **train_kwargs):
    pipe = minild.Pipeline.from_config(tiny_config(**(config_overrides or {})))
    return pipe, pipe.train(tiny_dataset(dataset_size), **train_kwargs)


# -- training features ------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_to_zero_at_the_last_step():
    config = minild.Pipeline.from_config(tiny_config(train={"warmup_steps": 4, "lr_schedule": "cosine"})).config.train
    cosine = [lr_factor(config, 10)(step) for step in range(11)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert cosine[4] == 1.0 and all(a > b for a, b in zip(cosine[4:], cosine[5:])) and cosine[10] == 0.0
    config.lr_schedule = "linear"
    assert [lr_factor(config, 10)(step) for step in range(4, 11)] == pytest.approx([1 - i / 6 for i in range(7)])
    config.lr_schedule, config.warmup_steps = "constant", 0
    assert {lr_factor(config, None)(step) for step in range(5)} == {1.0}


def test_trainer_uses_the_scheduled_lr_at_every_step(recorder):
    _, result = train(max_steps=6, warmup_steps=2, lr_schedule="linear", lr=0.01)
    config = minild.Pipeline.from_config(tiny_config(train={"warmup_steps": 2, "lr_schedule": "linear"})).config
    factor = lr_factor(config.train, 6)
    assert recorder.lrs == pytest.approx([0.01 * factor(step) for step in range(6)])


def test_lr_decay_needs_the_run_length():
    with pytest.raises(ValueError, match="lr_schedule 'cosine' decays over the run's length: set train.max_steps"):
        train(max_steps=None, max_minutes=1.0, lr_schedule="cosine")


def test_min_snr_weights_match_diffusers_min_snr_gamma_for_an_eps_model():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ours = minild.create("schedule", "linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    timesteps = torch.arange(1000)
    snr = compute_snr(reference, timesteps)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr  # diffusers' training scripts
    config = minild.Pipeline.from_config(tiny_config(train={"loss_weighting": "min_snr"})).config.train
    weights = loss_weights(config, ours.alphas_cumprod.double())
    assert config.min_snr_gamma == 5.0 and weights.shape == (1000,)
    torch.testing.assert_close(weights.float(), expected.float(), rtol=1e-5, atol=1e-6)
    assert weights[-1] == 1.0 and weights[0] < 0.01  # the noisiest steps keep full weight, the cleanest nearly none
    config.loss_weighting = "uniform"
    assert loss_weights(config, ours.alphas_cumprod) is None


def test_min_snr_training_weighs_the_same_draws_less_and_is_the_plain_loss_when_gamma_is_huge():
    _, uniform = train(max_steps=3)
    _, weighted = train(max_steps=3, loss_weighting="min_snr", min_snr_gamma=1.0)
    _, unclamped = train(max_steps=3, loss_weighting="min_snr", min_snr_gamma=1e12)
    # The same initial weights and draws: every weight is at most 1 and most are below, so the
    # first step's loss is strictly lower; with γ above every SNR the weights are all 1.
    assert weighted.losses[0] < uniform.losses[0]
    assert unclamped.losses == pytest.approx(uniform.losses, rel=1e-6)


def test_grad_accumulation_takes_one_optimizer_step_per_group_of_batches(recorder):
    _, result = train(batch_size=8, grad_accumulation_steps=2, max_steps=None, epochs=2)
    assert result.steps == 8 and result.epochs_completed == 2  # 64 images / (8 × 2) = 4 steps per epoch
    assert set(recorder.batch_sizes) == {16}
    assert len(result.losses) == 8 and all(math.isfinite(loss) for loss in result.losses)


def test_bf16_autocast_trains_on_the_cpu():
    _, fp32 = train(max_steps=2)
    _, bf16 = train(max_steps=2, precision="bf16", device="cpu")
    assert bf16.steps == 2 and bf16.losses != fp32.losses
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05)


def test_fp16_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device .* use 'bf16' or 'fp32'"):
        train(max_steps=2, precision="fp16", device="cpu")


def test_train_values_are_checked_at_the_config_edge_and_per_call(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(train={"precision": "fp8"})))
    with pytest.raises(ConfigError, match=rf"{path}: train.precision must be"):
        load_config(path)
    with pytest.raises(ValueError, match="train.grad_accumulation_steps must be at least 1, got 0"):
        train(grad_accumulation_steps=0)
    with pytest.raises(ValueError, match="train.loss_weighting must be one of 'uniform', 'min_snr', got 'snr'"):
        train(loss_weighting="snr")
    with pytest.raises(ValueError, match="train.min_snr_gamma must be positive, got 0"):
        train(loss_weighting="min_snr", min_snr_gamma=0)
    with pytest.raises(ValueError, match="train.lr_schedule must be one of 'constant', 'cosine', 'linear'"):
        train(lr_schedule="exponential")
    with pytest.raises(ValueError, match=r"train.seed must be in \[0, 2\*\*64\) \(torch wraps a negative seed"):
        train(seed=-1)


def _poison(model):
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))


class PoisonAfterCheckpoint:
    """Makes the weights NaN once the checkpoint of step ``step`` is written."""

    def __init__(self, step):
        self.step = step

    @minild.hookimpl
    def minild_checkpoint_saved(self, trainer, step):
        if step == self.step:
            _poison(trainer.model)


class PoisonBeforeCheckpoint:
    def __init__(self, step):
        self.step = step

    @minild.hookimpl
    def minild_train_step_end(self, trainer, step):
        if step == self.step:
            _poison(trainer.model)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    name = minild.register_plugin(PoisonAfterCheckpoint(step=3), name="test-poison")
    try:
        _, result = train(max_steps=10, hooks=[{"name": "checkpoint", "every_steps": 1}], run_dir=tmp_path)
    finally:
        minild.unregister_plugin(name)
    assert result.reason.startswith("non-finite loss (nan) at step 4: that step was not taken")
    assert result.steps == 3 and len(result.losses) == 3
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step-000003"
    weights = read_checkpoint(newest).tensors["model"]
    assert all(tensor.isfinite().all() for tensor in weights.values())


def test_checkpoint_hook_refuses_nan_weights_and_stops(tmp_path):
    name = minild.register_plugin(PoisonBeforeCheckpoint(step=3), name="test-poison-first")
    try:
        with pytest.warns(UserWarning):
            _, result = train(max_steps=10, hooks=[{"name": "checkpoint", "every_steps": 1}], run_dir=tmp_path)
    finally:
        minild.unregister_plugin(name)
    assert result.steps == 3
    assert "NaN or inf weights after step 3" in result.reason and "step-000002" in result.reason
    assert list_checkpoints(tmp_path)[-1].name == "step-000002"


# -- built-in hooks ---------------------------------------------------------------------


def test_without_a_run_dir_the_hooks_that_write_files_are_skipped_with_one_warning(recorder):
    hooks = ["progress", "metrics_log", "loss_plot", {"name": "sample_grid", "every_steps": 1}, "checkpoint",
             "tensorboard", {"name": "ema", "decay": 0.9}]
    with pytest.warns(UserWarning) as warned:
        pipe, result = train(max_steps=2, hooks=hooks)
    messages = [str(w.message) for w in warned if "run directory" in str(w.message)]
    assert messages == [
        "training without a run directory: skipping the trainer hooks that write files (metrics_log, loss_plot, "
        "sample_grid, checkpoint, tensorboard); pass run_dir=... to Pipeline.train (the CLI's --out) to write them"
    ]
    assert result.steps == 2 and pipe.ema_model is not None  # the other hooks ran
    assert recorder.images == []


def test_metrics_log_has_a_record_per_step_and_per_epoch(tmp_path):
    _, result = train(dataset_size=32, max_steps=None, epochs=2, hooks=["metrics_log"], run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["loss"] for r in steps] == result.losses
    assert [(r["epoch"], r["mean_loss"]) for r in epochs] == list(zip([1, 2], result.epoch_losses))
    assert {"lr", "images_per_second", "time"} <= set(steps[0])


def test_metrics_log_as_csv(tmp_path):
    train(max_steps=3, hooks=[{"name": "metrics_log", "file_format": "csv"}], run_dir=tmp_path)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("event,step,epoch,loss,lr") and len(lines) == 4


def test_loss_plot_is_written_at_epoch_end_and_at_the_end(tmp_path, recorder):
    class Look:
        @minild.hookimpl
        def minild_train_epoch_end(self, trainer):
            self.exists_after_first_epoch = (tmp_path / "loss.png").is_file()

    look = Look()
    name = minild.register_plugin(look, name="test-look")
    try:
        train(dataset_size=32, max_steps=5, hooks=["loss_plot"], run_dir=tmp_path)
    finally:
        minild.unregister_plugin(name)
    assert look.exists_after_first_epoch
    assert Image.open(tmp_path / "loss.png").size == (1100, 400)


def test_sample_grid_has_a_fixed_seed_one_column_per_class_and_leaves_training_alone(tmp_path, recorder):
    overrides = {"model": {"num_classes": 10}}
    grid = {"name": "sample_grid", "every_steps": 2, "every_epochs": None, "num_images": 20, "num_inference_steps": 2}
    _, plain = train(overrides, max_steps=4)
    pipe, result = train(overrides, max_steps=4, hooks=[grid], run_dir=tmp_path)
    assert result.losses == plain.losses  # sampling draws from its own seeded generator
    assert [step for step, _, _ in recorder.images] == [2, 4]
    assert all(recorder.training)  # the model went back to train mode after each grid
    for _, path, images in recorder.images:
        assert images.shape == (20, 1, 28, 28) and Image.open(path).size[0] >= 10 * 30 + 2
    again = pipe.generate(20, class_labels=[i % 10 for i in range(20)], num_inference_steps=2, seed=0)
    assert torch.allclose(again, recorder.images[-1][2], atol=1e-5)


def test_progress_bar_knows_the_total_from_epochs(capsys):
    train(dataset_size=32, max_steps=None, epochs=2, hooks=["progress"])
    assert "4/4" in capsys.readouterr().err


# -- third-party hooks ------------------------------------------------------------------

EXTERNAL_HOOKS = '''
"""A third-party trainer hook plugin: records the order of its callbacks."""
from minild import hookimpl

EVENTS = []


@hookimpl
def minild_train_start(trainer):
    EVENTS.append("train_start")


@hookimpl
def minild_train_step_end(step):
    EVENTS.append("step_end")


@hookimpl
def minild_train_epoch_end(epoch):
    EVENTS.append("epoch_end")


@hookimpl
def minild_checkpoint_saved(path, step):
    EVENTS.append("checkpoint_saved")


@hookimpl
def minild_train_end(reason):
    EVENTS.append("train_end")
'''


def test_third_party_hook_plugin_from_an_entry_point_sees_callbacks_in_order(tmp_path, monkeypatch):
    package = tmp_path / "site" / "minild_recorder"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(EXTERNAL_HOOKS)
    dist_info = tmp_path / "site" / "minild_recorder-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: minild-recorder\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[minild]\nrecorder = minild_recorder\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    plugins.reset_plugin_manager()
    try:
        hooks = [{"name": "checkpoint", "every_epochs": 1}]
        train(dataset_size=32, max_steps=None, epochs=1, hooks=hooks, run_dir=tmp_path / "run")
        events = sys.modules["minild_recorder"].EVENTS
    finally:
        monkeypatch.undo()
        sys.modules.pop("minild_recorder", None)
        plugins.reset_plugin_manager()
    assert events == ["train_start", "step_end", "step_end", "epoch_end", "checkpoint_saved", "train_end"]


# -- more than one process --------------------------------------------------------------


def test_two_cpu_processes_under_accelerate_match_one_process(tmp_path):
    hooks = ["progress", "metrics_log", {"name": "checkpoint", "every_steps": 3}]
    config = tiny_config(model={"num_classes": 10}, train={"max_steps": 6, "hooks": hooks})
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "minild.cli", "train", str(config_path), "--out", str(tmp_path / "run"), "--grid", "0", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parent.parent
    two = subprocess.run(launch, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    one = minild.Pipeline.from_config(config).train(run_dir=tmp_path / "one")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["event"] == "step"] == pytest.approx(one.losses, rel=1e-5)
    assert two.stdout.count("trained 6 steps") == 1  # one process reports and saves
    assert two.stderr.count("train:   0%") == 1  # one progress bar
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["step-000003", "step-000006"]
