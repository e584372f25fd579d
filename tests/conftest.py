"""Shared fixtures: tiny pipelines that train in seconds."""

from __future__ import annotations

import pytest
import torch

import minild


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


def tiny_config(**overrides):
    """A 1×28×28 digits pipeline small enough to train a few steps in well under a second."""
    config = {
        "schedule": {"name": "linear", "num_timesteps": 100},
        "model": {"name": "simple_unet", "in_channels": 1, "base_channels": 8, "time_embedding_dim": 16},
        "sampler": {"name": "ddim", "eta": 0.0},
        "data": {"dataset": "digits", "split": "test"},
        "train": {"batch_size": 16, "lr": 1e-3, "max_steps": 3, "hooks": [], "seed": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
def tiny_pipeline():
    return minild.Pipeline.from_config(tiny_config())
