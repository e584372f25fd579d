"""Shared fixtures: tiny pipelines that train in seconds."""

from __future__ import annotations

import json
import string

import huggingface_hub.constants
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import minild


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
    characters = [c for c in string.printable if not c.isspace()]
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=77
    )
    config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=len(vocab), max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    tokenizer.save_pretrained(directory)
    CLIPTextModel(config).save_pretrained(directory)
    return directory


# SDXL base's scheduler_config.json: Euler, scaled-linear betas, "leading" spacing with offset 1, and
# the DDIM fields (set_alpha_to_one, clip_sample) that other schedulers read through from_config.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory, tiny_clip_dir):
    """A random SDXL pipeline with SDXL's layout and scheduler, small enough for 64×64 in a second.

    Two CLIP text encoders (32-d hidden states each, concatenated to the UNet's 64-d context; the
    second with a 32-d pooled projection), a UNet with SDXL's "text_time" addition embedding
    (6 size/crop numbers × 8 + the 32-d pooled text = 80) and a two-level VAE (64 px ↔ 32² latents).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    directory = tmp_path_factory.mktemp("tiny_sdxl")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    text_config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, projection_dim=32,
        vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=64,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
