"""A tiny random SDXL pipeline built from configs, for running the prompt lab offline: the layout,
scheduler and loading path of SDXL base, with random weights small enough for 64×64 in a second.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

# SDXL base's scheduler_config.json: Euler, scaled-linear betas, "leading" spacing with offset 1, and
# the DDIM fields (set_alpha_to_one, clip_sample) that other schedulers read through from_config.
SDXL_BASE_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def write_tiny_clip_tokenizer(directory: str | Path):
    """A ``CLIPTokenizer`` over single printable characters, saved to ``directory`` and returned.

    Every non-space printable ASCII character is a token, alone and with the end-of-word ``</w>``
    suffix, and there are no merges, so any ASCII prompt tokenizes without a downloaded vocabulary.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    characters = [c for c in string.printable if not c.isspace()]
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    # Without model_max_length the tokenizer's default is huge and truncation to 77 overflows.
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_sdxl(directory: str | Path, *, seed: int = 0, inpainting: bool = False) -> Path:
    """Build a random ``StableDiffusionXLPipeline`` and ``save_pretrained`` it (safetensors) to ``directory``.

    Two CLIP text encoders (32-d hidden states each, concatenated to the UNet's 64-d context; the
    second with a 32-d pooled projection), a UNet with SDXL's "text_time" addition embedding
    (6 size/crop numbers × 8 + the 32-d pooled text = 80), a two-level VAE (64 px ↔ 4×32×32 latents)
    and SDXL base's scheduler config. The weights are random, drawn from ``seed`` without touching
    the caller's random state: images are noise-like, but every part of the pipeline runs for real.
    Returns ``directory``, which ``minild.lab.load_sdxl`` and diffusers' ``from_pretrained`` load.
    ``inpainting=True`` gives the UNet 9 input channels (latents, mask, masked-image latents), the
    layout of SDXL inpainting models.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as vocabulary:  # save_pretrained writes tokenizer/ and tokenizer_2/
        tokenizer = write_tiny_clip_tokenizer(vocabulary)
    text_config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, projection_dim=32,
        vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=9 if inpainting else 4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=64,
        )
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
