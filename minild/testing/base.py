"""The shared part of the plugin conformance suite (``minild.testing``): the base class every
suite derives from, and the small helpers the suites and tests use."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest
import torch

import minild
from minild import plugins

PLAIN_DATA = (int, float, bool, str, list, dict, type(None))


def available_devices() -> list[str]:
    """``"cpu"`` and every accelerator torch can reach here (``"cuda"``, ``"mps"``)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


DEVICES = available_devices()


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheap deterministic stand-in for an eps-model: nonlinear in ``x``, depends on ``t``,
    acts on each sample alone, keeps the dtype and device of ``x``."""
    return torch.tanh(0.5 * x) * (t.to(x.dtype) / 1000).view(-1, *[1] * (x.ndim - 1)) + 0.1 * torch.sin(x)


def check_plain_keyword_params(factory: Any, *, skip_first: bool = False) -> None:
    """Every constructor argument can be passed by keyword, is annotated and has a plain-data
    default, so a config can name it, type-check it, and a saved pipeline records it."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)
    parameters = list(inspect.signature(factory).parameters.values())
    if skip_first:
        parameters = parameters[1:]
    for parameter in parameters:
        where = f"{getattr(factory, '__qualname__', factory)}({parameter.name})"
        assert parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD), (
            f"{where} must be a named argument (factories are called with keyword arguments only)"
        )
        assert parameter.name in hints, f"{where} needs a type annotation (configs are type-checked against it)"
        assert parameter.default is not inspect.Parameter.empty and isinstance(parameter.default, PLAIN_DATA), (
            f"{where} needs a plain-data default (number, string, bool, list, dict or None)"
        )


class Conformance:
    kind: str = ""
    name: str = ""  # the registered name of the plugin under test
    params: dict[str, Any] = {}  # small keyword arguments for its factory

    @pytest.fixture(autouse=True)
    def _one_thread(self):
        # Tiny models gain nothing from threads, and spinning threads stall on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    def registration(self) -> plugins.Registration:
        assert self.name, f"{type(self).__name__} must set `name` to the registered {self.kind} name"
        return plugins.lookup(self.kind, self.name)

    def test_is_registered_under_its_name(self):
        assert self.name in minild.available(self.kind), (
            f"{self.kind} {self.name!r} is not registered; is the package installed and its entry point "
            "listed under [project.entry-points.minild]?"
        )
