"""Shared fixtures: tiny pipelines that train in seconds."""

from __future__ import annotations

import os

import huggingface_hub.constants
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import minild
from minild.lab.tiny_sdxl import build_tiny_sdxl, write_tiny_clip_tokenizer


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the suite's default, pyproject.toml): a worker per core, at most four."""
    return max(1, min(os.cpu_count() or 1, 4))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker takes its share of the cores: threads spinning in several workers at once stall
    # each other. The CLIs the tests start inherit the share through OMP_NUM_THREADS.
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


# Tiny versions of every built-in eps-model: a forward pass takes milliseconds.
TINY_MODELS = {
    "simple_unet": {"base_channels": 8, "channel_mults": [1, 2], "time_embedding_dim": 16, "norm_groups": 4},
    "film_unet": {"base_channels": 8, "time_embedding_dim": 16, "norm_groups": 4},
    "block_unet": {"down_channels": [8, 16, 16, 16], "up_channels": [16, 8, 8], "time_embedding_dim": 16},
    "naive_unet": {"base_channels": 8, "norm_groups": 4},
    "dummy_eps": {"channels": [8, 8]},
}


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


def tiny_class_pipeline():
    """A tiny class-conditional 1×28×28 pipeline on a 100-step linear schedule (random weights, seed 0)."""
    torch.manual_seed(0)
    config = tiny_config(model={"num_classes": 10}, train={"p_uncond": 0.1})
    config["image_shape"] = [1, 28, 28]
    return minild.Pipeline.from_config(config)


def tiny_latent_class_pipeline(directory):
    """The same on a random digits_vae saved into ``directory`` (1×28×28 ↔ 4×7×7 latents)."""
    torch.manual_seed(0)
    minild.create("vae", "digits_vae", latent_channels=4, base_channels=8, norm_groups=4, latent_scale=0.5).save_pretrained(directory)
    config = tiny_config(vae={"name": "digits_vae", "pretrained": str(directory)},
                         model={"in_channels": 4, "channel_mults": [1, 2], "num_classes": 10})
    config["image_shape"] = [4, 7, 7]
    return minild.Pipeline.from_config(config)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads stall when cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pipeline():
    return minild.Pipeline.from_config(tiny_config())


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the variable and its copy.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A CLIP tokenizer over single printable characters and a 2-layer, 32-d CLIPTextModel."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = write_tiny_clip_tokenizer(directory)
    config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A random SDXL pipeline with SDXL's layout and scheduler, small enough for 64×64 in a second
    (``minild.lab.tiny_sdxl.build_tiny_sdxl``, which the prompt-lab notebook runs offline too)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))
