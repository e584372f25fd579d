"""The training loop's GPU path, checked on the CPU: losses read back every N steps instead of
every step (same numbers, no per-step .item()), a non-finite loss still stops the run, and
train.compile hands the model to torch.compile with the chosen mode."""

import pytest
import torch

import minild
from minild.train_step import compile_model, loss_readback_interval
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
    with pytest.raises(ValueError, match="train.compile must be one of 'off', 'default', 'reduce-overhead'"):
        train(compile="fast")
    with pytest.raises(ValueError, match="train.loss_readback_every must be at least 1 or null, got 0"):
        train(loss_readback_every=0)
