"""The tiny random SDXL pipeline the prompt lab and its tests run offline."""

import json

import torch
from safetensors.torch import load_file

from minild.lab.sdxl import load_sdxl
from minild.lab.tiny_sdxl import SDXL_BASE_SCHEDULER_CONFIG, build_tiny_sdxl


def weights(directory):
    return {path.relative_to(directory).as_posix(): load_file(path) for path in sorted(directory.glob("*/*.safetensors"))}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_tiny_sdxl_is_a_safetensors_pipeline_folder_with_sdxl_base_scheduler(tmp_path):
    directory = build_tiny_sdxl(tmp_path / "tiny")
    assert set(json.loads((directory / "model_index.json").read_text())) >= {
        "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler",
    }
    assert set(weights(directory)) == {
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    }
    scheduler = json.loads((directory / "scheduler/scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SDXL_BASE_SCHEDULER_CONFIG if k != "_class_name"} == {
        k: v for k, v in SDXL_BASE_SCHEDULER_CONFIG.items() if k != "_class_name"
    }


def test_tiny_sdxl_weights_depend_on_the_seed_alone_and_leave_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = weights(build_tiny_sdxl(tmp_path / "a", seed=0))
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is untouched
    assert same(first, weights(build_tiny_sdxl(tmp_path / "b", seed=0)))
    assert not same(first, weights(build_tiny_sdxl(tmp_path / "c", seed=1)))


def test_tiny_sdxl_loads_offline_and_tokenizes_any_ascii_prompt(tmp_path, offline):
    pipe = load_sdxl(build_tiny_sdxl(tmp_path / "tiny"), device="cpu")
    prompt = "a red fox, 3d!"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    # One token per character; an unknown one would be <|endoftext|> (the unk token) and end the text early.
    assert ids.index(pipe.tokenizer.eos_token_id) - 1 == len(prompt.replace(" ", ""))
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
