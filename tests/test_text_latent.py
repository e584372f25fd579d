"""configs/digits_text_latent.yaml, the latent text-to-image pipeline: one `minild train` trains
the VAE first when there is none, the run holds everything, prompts go in by API and CLI, and
bad prompts or a VAE that does not fit are refused before any training."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

import minild
from minild.cli import main
from minild.config import load_config
from minild.errors import GenerateArgumentError
from minild.evaluation.prompts import HELD_OUT_TEMPLATES
from minild.training.vae_bootstrap import ensure_vae

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VAE = {"vae": {"name": "digits_vae", "latent_channels": 4, "base_channels": 8, "num_downsamples": 2},
            "data": {"dataset": "digits", "split": "test"}, "train": {"batch_size": 16, "max_steps": 2}}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def tiny_text_latent(tmp_path: Path, **vae_train) -> Path:
    """The shipped config shrunk: its VAE (trained first, into tmp_path/vae) and its UNet tiny."""
    vae_config = {**TINY_VAE, "vae": {**TINY_VAE["vae"], **vae_train}}
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(vae_config))
    config = yaml.safe_load((CONFIGS / "digits_text_latent.yaml").read_text())
    config["vae"]["pretrained"] = str(tmp_path / "vae")
    config["vae_training"] = "vae.yaml"  # found next to the config file
    config["schedule"]["num_timesteps"] = 50
    config["model"].update(base_channels=8, time_embedding_dim=16, norm_groups=4)
    config["data"]["split"] = "test"
    config["train"].update(hooks=[], batch_size=8, max_minutes=None, max_steps=2)
    path = tmp_path / "text_latent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_shipped_config_composes_vae_text_encoder_cross_attention_guidance_and_a_fast_sampler():
    config = load_config(CONFIGS / "digits_text_latent.yaml")
    assert config.vae.name == "digits_vae" and config.vae_training == "digits_vae.yaml"
    assert config.text_encoder.name == "minilm" and config.model.params["cross_attention_dim"] == 384
    assert config.model.params["in_channels"] == 4  # the VAE's latent channels
    assert config.guidance is not None and config.sampler.name == "dpm_solver_pp"
    assert not set(HELD_OUT_TEMPLATES) & set(config.data.prompt_templates)


def test_one_train_command_trains_the_vae_first_and_the_run_holds_everything(tmp_path, capsys):
    config = tiny_text_latent(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--grid", "0"]) == 0
    out = capsys.readouterr().out
    assert "holds no VAE yet: training one first" in out and "trained the VAE 2 steps" in out
    assert (tmp_path / "vae" / "config.json").is_file() and (run / "vae" / "model.safetensors").is_file()

    pipe = minild.Pipeline.from_pretrained(run)
    assert Path(pipe.config.vae.params["pretrained"]) == run / "vae"
    images = pipe.generate(prompts=["seven", "a picture of the digit three"], num_inference_steps=2, seed=0)
    assert images.shape == (2, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    again = minild.Pipeline.from_pretrained(run).generate(prompts=["seven", "a picture of the digit three"],
                                                          num_inference_steps=2, seed=0)
    assert torch.equal(images, again)

    grid = tmp_path / "prompts.png"
    assert main(["sample", str(run), "--prompt", "seven", "--prompt", "the digit 3", "--num", "2", "--steps", "2",
                 "--out", str(grid)]) == 0
    assert grid.stat().st_size > 1000

    # A second run reuses the VAE it finds.
    assert main(["train", str(config), "--out", str(tmp_path / "run2"), "--grid", "0"]) == 0
    assert "training one first" not in capsys.readouterr().out


def test_a_vae_config_with_other_latent_channels_is_refused_before_any_training(tmp_path):
    config = load_config(tiny_text_latent(tmp_path, latent_channels=3))
    with pytest.raises(ValueError, match=r"3-channel latents but model.in_channels is 4: set model.in_channels: 3"):
        ensure_vae(config, config_path=tmp_path / "text_latent.yaml")
    assert not (tmp_path / "vae").exists()


def test_a_vae_trained_on_other_data_is_refused(tmp_path):
    config = load_config(tiny_text_latent(tmp_path))
    config.data.dataset = "fashion"
    with pytest.raises(ValueError, match="train the VAE on the data it will encode"):
        ensure_vae(config, config_path=tmp_path / "text_latent.yaml")


def test_a_missing_vae_training_config_names_the_paths_tried(tmp_path):
    config = load_config(tiny_text_latent(tmp_path))
    config.vae_training = "nowhere.yaml"
    with pytest.raises(FileNotFoundError, match="vae_training: nowhere.yaml does not exist"):
        ensure_vae(config, config_path=tmp_path / "text_latent.yaml")


def test_a_saved_vae_of_other_latent_channels_is_refused_by_the_pipeline(tmp_path):
    minild.create("vae", "digits_vae", latent_channels=3, base_channels=8).save_pretrained(tmp_path / "vae")
    config = load_config(tiny_text_latent(tmp_path))
    with pytest.raises(ValueError, match="set model.in_channels: 3"):
        minild.Pipeline.from_config(config)


@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("text-latent")
    minild.create("vae", "digits_vae", base_channels=8).save_pretrained(tmp_path / "vae")
    pipe = minild.Pipeline.from_config(load_config(tiny_text_latent(tmp_path)))
    pipe.config.image_shape = [4, 7, 7]
    return pipe


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": ""}, r"prompts\[0\] is empty: the empty prompt is the unconditional one"),
    ({"prompts": ["seven", "  "]}, r"prompts\[1\] is empty"),
    ({"prompts": ["seven", 7]}, r"prompts\[1\] is 7 \(int\)"),
    ({"prompts": 7}, "prompts must be a string or a list of strings"),
    ({"class_labels": [7]}, r"is text-conditioned, not class-conditional: pass prompts=\[...\]"),
])
def test_bad_prompts_and_class_labels_on_a_text_model_are_one_error_naming_the_fix(text_pipe, kwargs, message):
    with pytest.raises(GenerateArgumentError, match=message):
        text_pipe.generate(num_inference_steps=1, **kwargs)


def test_a_prompt_longer_than_max_length_is_truncated_with_one_warning(text_pipe):
    long = "a very neatly handwritten digit seven drawn with a thick black pen"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text_pipe.generate(prompts=[long, long, "seven"], num_inference_steps=1, seed=0)
    truncation = [w for w in caught if "truncated" in str(w.message)]
    assert len(truncation) == 1
    assert "1 prompt(s) are longer than the text encoder's max_length=8 tokens" in str(truncation[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_pipe.generate(prompts=["seven"], num_inference_steps=1, seed=0)  # fits: no warning


def test_prompts_on_a_class_only_model_point_at_class_labels():
    pipe = minild.Pipeline.from_config({
        "schedule": {"name": "linear", "num_timesteps": 10},
        "model": {"name": "simple_unet", "base_channels": 8, "channel_mults": [1, 2], "time_embedding_dim": 16,
                  "norm_groups": 4, "num_classes": 3},
        "sampler": "ddim", "image_shape": [1, 8, 8], "train": {"hooks": []},
    })
    with pytest.raises(GenerateArgumentError, match=r"is not text-conditioned.*Pass class_labels=\[...\] instead"):
        pipe.generate(prompts=["seven"], num_inference_steps=1)
