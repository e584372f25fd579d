"""VAE stages and latent diffusion: tiny random VAEs saved to disk and loaded through the plugins;
no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

import minild
from minild.cli import main
from minild.config import ConfigError, load_vae_training_config
from minild.data import load_dataset
from minild_plugins.vaes import VAEUnavailableError
from tests.conftest import tiny_config

TINY_DIGITS_VAE = {"latent_channels": 4, "base_channels": 8, "norm_groups": 4}


@pytest.fixture(scope="module")
def tiny_digits_vae_dir(tmp_path_factory):
    """An untrained 1×28×28 → 4×7×7 digits_vae with latent_scale 0.5, saved to disk."""
    directory = tmp_path_factory.mktemp("digits_vae")
    torch.manual_seed(0)
    vae = minild.create("vae", "digits_vae", **TINY_DIGITS_VAE, latent_scale=0.5)
    vae.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_autoencoder_kl_dir(tmp_path_factory):
    """A two-block AutoencoderKL (one halving) for 1-channel images, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("autoencoder_kl")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=28, scaling_factor=0.25,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).save_pretrained(directory)
    return directory


def latent_config(vae_dir, **model):
    """A tiny class-conditional latent pipeline: simple_unet with two levels (7 → 3 → 1) on 4×7×7."""
    model = {"in_channels": 4, "channel_mults": [1, 2], "num_classes": 10, **model}
    return tiny_config(vae={"name": "digits_vae", "pretrained": str(vae_dir)}, model=model)


def digits(n=6):
    return load_dataset("digits", split="test").images[::50][:n]  # [n, 1, 28, 28] in [-1, 1]


def test_the_built_in_vaes_are_registered():
    assert {"autoencoder_kl", "digits_vae"} <= set(minild.available("vae"))


# -- digits_vae ----------------------------------------------------------------------


def test_digits_vae_encodes_digits_to_4x7x7_latents_and_decodes_to_images():
    vae = minild.create("vae", "digits_vae", **TINY_DIGITS_VAE)
    latents = vae.encode(digits())
    assert latents.shape == (6, 4, 7, 7)
    assert vae.latent_shape((1, 28, 28)) == (4, 7, 7) and vae.latent_channels == 4
    images = vae.decode(latents)
    assert images.shape == (6, 1, 28, 28)
    assert images.abs().max() <= 1


@pytest.mark.parametrize(
    ("name", "latent_shape"), [("digits_vae.yaml", (4, 7, 7)), ("digits_vae_f2.yaml", (2, 14, 14))]
)
def test_the_shipped_digits_vae_configs_build_the_latents_they_promise(name, latent_shape):
    config = load_vae_training_config(Path(__file__).resolve().parents[1] / "configs" / name)
    vae = minild.create("vae", config.vae.name, **config.vae.params)
    assert vae.latent_shape((1, 28, 28)) == latent_shape
    assert vae.encode(digits(2)).shape == (2, *latent_shape)


def test_digits_vae_latents_are_multiplied_by_the_latent_scale(tiny_digits_vae_dir):
    scaled = minild.create("vae", "digits_vae", pretrained=str(tiny_digits_vae_dir))
    unscaled = minild.create("vae", "digits_vae", pretrained=str(tiny_digits_vae_dir), latent_scale=1.0)
    assert scaled.latent_scale == 0.5
    torch.testing.assert_close(scaled.encode(digits()), 0.5 * unscaled.encode(digits()))
    latents = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(scaled.decode(latents), unscaled.decode(latents / 0.5))


def test_digits_vae_posterior_sample_draws_from_the_generator_around_the_mode(tiny_digits_vae_dir):
    mode = minild.create("vae", "digits_vae", pretrained=str(tiny_digits_vae_dir))
    sampling = minild.create("vae", "digits_vae", pretrained=str(tiny_digits_vae_dir), posterior="sample")
    first = sampling.encode(digits(), generator=torch.Generator().manual_seed(1))
    again = sampling.encode(digits(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert not torch.allclose(first, mode.encode(digits()))


def test_digits_vae_save_and_load_gives_the_same_latents_and_images(tiny_digits_vae_dir, tmp_path):
    vae = minild.create("vae", "digits_vae", pretrained=str(tiny_digits_vae_dir))
    vae.save_pretrained(tmp_path)
    reloaded = minild.create("vae", "digits_vae", pretrained=str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["latent_scale"] == 0.5
    assert torch.equal(reloaded.encode(digits()), vae.encode(digits()))
    latents = torch.randn(2, 4, 7, 7)
    assert torch.equal(reloaded.decode(latents), vae.decode(latents))


def test_digits_vae_refuses_an_architecture_that_differs_from_the_saved_one(tiny_digits_vae_dir):
    with pytest.raises(ValueError, match="base_channels=16 but the VAE saved in .* has base_channels=8"):
        minild.create("vae", "digits_vae", pretrained=str(tiny_digits_vae_dir), base_channels=16)


def test_digits_vae_from_a_directory_without_its_config_says_how_to_make_one(tmp_path):
    with pytest.raises(VAEUnavailableError, match="config.json does not exist.*minild train-vae"):
        minild.create("vae", "digits_vae", pretrained=str(tmp_path))


def test_digits_vae_refuses_images_it_cannot_encode():
    vae = minild.create("vae", "digits_vae", **TINY_DIGITS_VAE)
    with pytest.raises(ValueError, match="1-channel images with sides divisible by 4, got \\(3, 30, 30\\)"):
        vae.latent_shape((3, 30, 30))


# -- autoencoder_kl ------------------------------------------------------------------


def test_autoencoder_kl_scales_the_posterior_mode_like_diffusers(tiny_autoencoder_kl_dir, offline):
    vae = minild.create("vae", "autoencoder_kl", pretrained=str(tiny_autoencoder_kl_dir))
    reference = AutoencoderKL.from_pretrained(tiny_autoencoder_kl_dir).eval()
    images = digits()
    latents = vae.encode(images)
    assert latents.shape == (6, 4, 14, 14) and vae.latent_shape((1, 28, 28)) == (4, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(latents, reference.encode(images).latent_dist.mode() * 0.25)
        torch.testing.assert_close(vae.decode(latents), reference.decode(latents / 0.25).sample)
    assert vae.latent_channels == 4 and not any(p.requires_grad for p in vae.parameters())


def test_autoencoder_kl_scaling_factor_can_be_overridden(tiny_autoencoder_kl_dir, offline):
    default = minild.create("vae", "autoencoder_kl", pretrained=str(tiny_autoencoder_kl_dir))
    custom = minild.create("vae", "autoencoder_kl", pretrained=str(tiny_autoencoder_kl_dir), scaling_factor=1.0)
    torch.testing.assert_close(custom.encode(digits()), default.encode(digits()) / 0.25)


def test_autoencoder_kl_offline_hub_id_is_an_error_naming_what_was_tried(offline):
    with pytest.raises(VAEUnavailableError, match="cannot load autoencoder_kl from 'nobody/no-such-vae'.*local directory"):
        minild.create("vae", "autoencoder_kl", pretrained="nobody/no-such-vae")


def test_autoencoder_kl_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(VAEUnavailableError, match="the directory has no config.json.*subfolder='vae'"):
        minild.create("vae", "autoencoder_kl", pretrained=str(tmp_path))


# -- minild train-vae ----------------------------------------------------------------


def test_train_vae_writes_the_vae_its_latent_scale_reconstructions_and_mse(tmp_path, capsys):
    config = tmp_path / "vae.yaml"
    config.write_text(json.dumps({
        "vae": {"name": "digits_vae", **TINY_DIGITS_VAE},
        "data": {"dataset": "digits", "split": "test"},
        "train": {"batch_size": 32, "max_steps": 2, "device": "cpu"},
    }))
    out = tmp_path / "vae"
    assert main(["train-vae", str(config), "--out", str(out)]) == 0
    assert "reconstruction MSE" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "reconstructions.png", "metrics.json", "train_vae.yaml"} <= {
        p.name for p in out.iterdir()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["reconstruction_mse_train"] > 0
    vae = minild.create("vae", "digits_vae", pretrained=str(out))
    assert vae.latent_scale == pytest.approx(1 / metrics["latent_std"])
    latents = vae.encode(load_dataset("digits", split="test").images)
    assert latents.std().item() == pytest.approx(1.0, rel=1e-3)  # scaled to unit variance on its data


def test_train_vae_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key train.kl; known keys: batch_size"):
        load_vae_training_config({"vae": {"name": "digits_vae"}, "train": {"kl": 0.1}})


def test_train_vae_refuses_a_vae_it_cannot_train(tiny_autoencoder_kl_dir):
    from minild.training.vae import train_vae

    config = load_vae_training_config({
        "vae": {"name": "autoencoder_kl", "pretrained": str(tiny_autoencoder_kl_dir)}, "train": {"max_steps": 1},
    })
    with pytest.raises(ValueError, match="cannot be trained by minild.*training_losses"):
        train_vae(config)


# -- latent diffusion through the pipeline -------------------------------------------


def test_latent_pipeline_trains_on_latents_and_generates_images_of_the_data_shape(tiny_digits_vae_dir):
    pipe = minild.Pipeline.from_config(latent_config(tiny_digits_vae_dir))
    seen = []
    pipe.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    result = pipe.train(max_steps=2)
    # One zero latent checks the model's input before training, then two batches of 16.
    assert result.steps == 2 and seen == [(1, 4, 7, 7)] + [(16, 4, 7, 7)] * 2
    assert pipe.image_shape == (4, 7, 7)
    images = pipe.generate(class_labels=[3, 7], guidance_scale=3.0, num_inference_steps=3, seed=0)
    assert images.shape == (2, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1


def test_the_dataset_is_encoded_once_with_the_posterior_mode(tiny_digits_vae_dir):
    pipe = minild.Pipeline.from_config(latent_config(tiny_digits_vae_dir))
    dataset = pipe.load_dataset()
    encoded = pipe.encode_dataset(dataset)
    assert pipe.encode_dataset(dataset) is encoded
    assert pipe.encode_dataset(encoded) is encoded  # train(encoded) does not encode twice
    torch.testing.assert_close(encoded.images[:6], pipe.vae.encode(dataset.images[:6]))
    assert torch.equal(encoded.labels, dataset.labels)


def test_latent_pipeline_saves_its_vae_and_reloads_to_identical_samples(tiny_digits_vae_dir, tmp_path):
    vae_copy = tmp_path / "vae-elsewhere"
    shutil.copytree(tiny_digits_vae_dir, vae_copy)
    pipe = minild.Pipeline.from_config(latent_config(vae_copy))
    pipe.train(max_steps=2)
    pipe.save_pretrained(tmp_path / "run")
    shutil.rmtree(vae_copy)  # the run directory alone must be enough
    reloaded = minild.Pipeline.from_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "vae" / "model.safetensors").is_file()
    assert reloaded.config.vae.params["pretrained"] == str(tmp_path / "run" / "vae")
    assert "pretrained: vae" in (tmp_path / "run" / "config.yaml").read_text()
    kwargs = dict(class_labels=[1, 2, 3], guidance_scale=3.0, num_inference_steps=3, seed=0)
    assert torch.equal(reloaded.generate(**kwargs), pipe.generate(**kwargs))


def test_autoencoder_kl_from_a_subfolder_round_trips_through_a_saved_pipeline(tiny_autoencoder_kl_dir, tmp_path,
                                                                                offline):
    shutil.copytree(tiny_autoencoder_kl_dir, tmp_path / "checkout" / "vae")  # like a Stable Diffusion checkout
    vae = {"name": "autoencoder_kl", "pretrained": str(tmp_path / "checkout"), "subfolder": "vae"}
    pipe = minild.Pipeline.from_config(tiny_config(vae=vae, model={"in_channels": 4, "channel_mults": [1, 2]}))
    pipe.train(max_steps=1)
    assert pipe.image_shape == (4, 14, 14)
    pipe.save_pretrained(tmp_path / "run")
    shutil.rmtree(tmp_path / "checkout")
    reloaded = minild.Pipeline.from_pretrained(tmp_path / "run")
    assert "subfolder" not in reloaded.config.vae.params and reloaded.vae.scaling_factor == 0.25
    kwargs = dict(num_images=2, num_inference_steps=2, seed=0)
    images = reloaded.generate(**kwargs)
    assert images.shape == (2, 1, 28, 28)
    assert torch.equal(images, pipe.generate(**kwargs))


def test_model_in_channels_must_match_the_vae_latent_channels(tiny_digits_vae_dir):
    config = latent_config(tiny_digits_vae_dir, in_channels=1)
    with pytest.raises(ValueError, match="4-channel latents but the model 'simple_unet' has in_channels=1: "
                                         "set model.in_channels: 4"):
        minild.Pipeline.from_config(config)
