"""The training loop's GPU path, checked on the CPU: losses read back every N steps instead of
every step (same numbers, no per-step .item()), a non-finite loss still stops the run, and
train.compile hands the model to torch.compile with the chosen mode."""

import json

import pytest
import torch

import minild
from minild.config import TrainConfig
from minild.devices import use_channels_last
from minild.training.step import compile_model, loss_readback_interval, resolve_compile
from tests.conftest import tiny_config
from tests.test_train import PoisonBeforeCheckpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def count_item(monkeypatch):
    calls = []
    original = torch.Tensor.item

    def item(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    return calls


def test_loss_readback_every_n_steps_gives_the_same_losses_without_per_step_item(count_item):
    _, every_step = train(max_steps=7, hooks=["ema"])
    assert len(count_item) == 7  # one read-back per step
    count_item.clear()
    _, batched = train(max_steps=7, hooks=["ema", "progress"], loss_readback_every=3)
    assert count_item == []  # read back with one .tolist() per 3 steps (and at the end)
    assert batched.losses == every_step.losses and batched.steps == 7


def test_metrics_log_records_every_step_loss_without_a_per_step_read_back(count_item, tmp_path):
    _, every_step = train(max_steps=7, hooks=["ema"])
    count_item.clear()
    hooks = ["ema", {"name": "metrics_log", "flush_every": 4}]
    _, result = train(max_steps=7, hooks=hooks, loss_readback_every=50, run_dir=tmp_path)
    assert count_item == []  # metrics_log takes no `loss`: it fills the losses in when it writes
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if record["event"] == "step"]
    assert [record["step"] for record in steps] == list(range(1, 8))
    assert [record["loss"] for record in steps] == result.losses == every_step.losses


def test_a_hook_that_names_loss_gets_it_every_step():
    seen = []

    class NeedsLoss:
        @minild.hookimpl
        def minild_train_step_end(self, step, loss):
            seen.append((step, loss))

    name = minild.register_plugin(NeedsLoss(), name="test-needs-loss")
    try:
        _, result = train(max_steps=4, loss_readback_every=50)
    finally:
        minild.unregister_plugin(name)
    assert [step for step, _ in seen] == [1, 2, 3, 4] and [loss for _, loss in seen] == result.losses


def test_a_non_finite_loss_read_back_late_still_stops_the_run():
    name = minild.register_plugin(PoisonBeforeCheckpoint(step=2), name="test-poison-late")
    try:
        _, result = train(max_steps=10, loss_readback_every=2)
    finally:
        minild.unregister_plugin(name)
    assert result.reason.startswith("non-finite loss (nan) at step 3, read back at step 4")
    assert result.steps == 4 and len(result.losses) == 2


def test_readback_interval_is_one_on_cpu_and_batched_on_gpus():
    config = minild.Pipeline.from_config(tiny_config()).config.train
    assert loss_readback_interval(config, torch.device("cpu")) == 1
    assert loss_readback_interval(config, torch.device("cuda")) == 50
    config.loss_readback_every = 7
    assert loss_readback_interval(config, torch.device("cuda")) == 7


@pytest.mark.parametrize("mode, expected", [("default", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_hands_the_model_to_torch_compile(monkeypatch, mode, expected):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: calls.append(mode) or model)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "off") is model and calls == []
    assert compile_model(model, mode) is model and calls == [expected]
    _, result = train(max_steps=2, compile=mode)
    assert calls == [expected, expected] and result.steps == 2


def test_bad_compile_and_readback_values_are_config_errors():
    with pytest.raises(ValueError, match="train.compile must be one of 'auto', 'off', 'default', 'reduce-overhead'"):
        train(compile="fast")
    with pytest.raises(ValueError, match="train.loss_readback_every must be at least 1 or null, got 0"):
        train(loss_readback_every=0)


CUDA, CPU, MPS = torch.device("cuda"), torch.device("cpu"), torch.device("mps")


@pytest.mark.parametrize("budget, total_steps, expected", [
    ({"max_minutes": 10}, None, "reduce-overhead"),  # the main config: ten minutes
    ({"max_minutes": 10, "max_steps": 500}, 500, "off"),  # a short run in steps does not win the compile back
    ({"max_minutes": 2}, None, "off"),
    ({"max_steps": 50_000}, 50_000, "reduce-overhead"),
    ({"epochs": 2}, 140, "off"),
])
def test_auto_compile_is_for_long_runs_on_cuda(monkeypatch, budget, total_steps, expected):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if Triton were installed
    config = TrainConfig(**budget)
    assert resolve_compile(config, CUDA, total_steps) == expected
    assert resolve_compile(config, CPU, total_steps) == "off" and resolve_compile(config, MPS, total_steps) == "off"
    assert resolve_compile(config, CUDA, total_steps, world_size=2) == "off"
    config.compile = "default"
    assert resolve_compile(config, CPU, total_steps) == "default"  # a mode asked for is taken anywhere


def test_auto_compile_needs_triton(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert resolve_compile(TrainConfig(max_minutes=10), CUDA, None) == "off"


def test_channels_last_by_default_where_it_was_measured_faster():
    assert use_channels_last(None, CPU, compiled=False) and use_channels_last(None, CPU, compiled=True)
    assert not use_channels_last(None, CUDA, compiled=False) and use_channels_last(None, CUDA, compiled=True)
    assert not use_channels_last(None, MPS, compiled=False) and not use_channels_last(True, MPS, compiled=False)
    assert use_channels_last(True, CUDA, compiled=False) and not use_channels_last(False, CPU, compiled=False)


def test_auto_compile_leaves_cpu_training_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled on a CPU"))
    _, result = train(max_steps=2)  # train.compile defaults to "auto"
    assert result.steps == 2


def test_the_progress_bar_says_when_the_first_steps_compile(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    train(max_steps=2, hooks=["progress"], compile="reduce-overhead")
    assert "torch.compile (mode reduce-overhead) compiles the model in the first steps" in capsys.readouterr().out
    train(max_steps=2, hooks=["progress"])  # auto: off on a CPU, nothing to say
    assert "torch.compile" not in capsys.readouterr().out


class FailsToCompile(torch.nn.Module):
    """What torch.compile hands back for a model it cannot compile: it fails at the first call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: no working C++ compiler")


def test_an_auto_compile_that_fails_trains_the_model_uncompiled(monkeypatch):
    _, eager = train(max_steps=3, compile="off")
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: FailsToCompile(model))
    monkeypatch.setattr("minild.training.trainer.resolve_compile",  # as on a CUDA machine
                        lambda config, *args: "reduce-overhead" if config.compile == "auto" else config.compile)
    with pytest.warns(UserWarning, match="torch.compile could not compile the model .RuntimeError: BackendCompiler"):
        _, result = train(max_steps=3)
    assert result.losses == eager.losses  # the failed pass was redone on the same batch, noise and t
    with pytest.raises(RuntimeError, match="no working C\\+\\+ compiler"):
        train(max_steps=3, compile="reduce-overhead")  # asked for by name: its failure is the user's to see
