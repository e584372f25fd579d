"""Bad inputs and the errors a user sees: each names the culprit and says what to do.

One test per row of docs/errors.md that no other test file already covers.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import minild
from minild.training import checkpoint
from minild.config import ConfigError, load_config
from minild.data import ImageTensorDataset
from minild.io import UnwritableDirectoryError, check_writable_dir
from tests.conftest import tiny_config
from tests.test_train import tiny_dataset


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


def write_config(tmp_path, config, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


# -- configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "culprit", "suggestion"),
    [
        ({**tiny_config(), "shedule": {"name": "linear"}}, "shedule", "schedule"),
        (tiny_config(train={"batchsize": 8}), "train.batchsize", "batch_size"),
        (tiny_config(data={"datset": "digits"}), "data.datset", "dataset"),
        (tiny_config(model={"base_chanels": 8}), "model.base_chanels", "base_channels"),
        (tiny_config(train={"hooks": [{"name": "ema", "decai": 0.9}]}), r"train.hooks\[0\].decai", "decay"),
    ],
)
def test_misspelt_key_suggests_the_closest_one(tmp_path, config, culprit, suggestion):
    path = write_config(tmp_path, config)
    with pytest.raises(ConfigError, match=rf"{path}: unknown key {culprit} \(did you mean '{suggestion}'\?\)"):
        load_config(path)


def test_a_key_like_no_known_one_gets_no_suggestion(tmp_path):
    path = write_config(tmp_path, tiny_config(train={"zzz": 1}))
    with pytest.raises(ConfigError, match=r"unknown key train.zzz; known keys: batch_size") as error:
        load_config(path)
    assert "did you mean" not in str(error.value)


def test_misspelt_stage_name_suggests_the_closest_one(tmp_path):
    path = write_config(tmp_path, tiny_config(model={"name": "simple_unte"}))
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'simple_unte' \(did you mean 'simple_unet'\?\)"):
        load_config(path)


def test_config_that_is_not_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("schedule: {name: linear\nmodel: [")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_config(path)


def test_config_that_is_not_a_mapping_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- linear\n- simple_unet\n")
    with pytest.raises(ConfigError, match=rf"{path}: the config must be a mapping of sections, got list"):
        load_config(path)


# -- data against the model ---------------------------------------------------------------


def test_image_size_the_model_cannot_take_is_refused_before_training():
    pipe = minild.Pipeline.from_config(tiny_config(data={"image_size": 2}))  # simple_unet: 3 levels, sides >= 8
    with pytest.raises(ValueError, match=r"model 'simple_unet' cannot take 1×2×2 inputs: .*at least 8.*data.image_size"):
        pipe.train(max_steps=1)


def test_data_channels_that_differ_from_the_model_name_both_keys():
    pipe = minild.Pipeline.from_config(tiny_config(data={"channels": 3}))
    with pytest.raises(
        ValueError,
        match=r"takes 1-channel inputs \(model.in_channels\) but the data gives 3-channel images .*"
        r"set model.in_channels: 3, or data.channels: 1",
    ):
        pipe.train(max_steps=1)


def test_vae_latent_channels_that_differ_from_the_model_name_the_vae():
    class FourChannelLatents(torch.nn.Module):
        latent_channels = 4

        def latent_shape(self, image_shape):
            return (4, image_shape[1] // 4, image_shape[2] // 4)

    class LatentPlugin:
        @minild.hookimpl
        def register_vaes(self, register):
            register("test_latents", FourChannelLatents)

    name = minild.register_plugin(LatentPlugin(), name="test-latent-vae")
    try:
        with pytest.raises(
            ValueError,
            match=r"vae 'test_latents' makes 4-channel latents but the model 'simple_unet' has in_channels=1: "
                  r"set model.in_channels: 4",
        ):
            minild.Pipeline.from_config(tiny_config(vae={"name": "test_latents"}))
    finally:
        minild.unregister_plugin(name)


def test_model_whose_eps_has_other_channels_than_its_input_is_refused():
    pipe = minild.Pipeline.from_config(tiny_config(model={"out_channels": 3}))
    with pytest.raises(ValueError, match=r"returns eps of shape \[3, 28, 28\] .* set model.out_channels: 1"):
        pipe.train(max_steps=1)


def test_training_labels_outside_num_classes_are_refused():
    digits = tiny_dataset(32)
    dataset = ImageTensorDataset(digits.images, torch.arange(32) % 10)
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 5}))
    with pytest.raises(ValueError, match=r"dataset labels span \[0, 9\] but the model has num_classes=5"):
        pipe.train(dataset, max_steps=1)


def test_empty_dataset_is_refused_naming_the_data_section():
    pipe = minild.Pipeline.from_config(tiny_config())
    empty = ImageTensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the training dataset is empty \(data.dataset 'digits'"):
        pipe.train(empty, max_steps=1)


def test_dataset_smaller_than_one_batch_says_so():
    pipe = minild.Pipeline.from_config(tiny_config(train={"batch_size": 16, "grad_accumulation_steps": 4}))
    with pytest.raises(ValueError, match=r"the dataset has 16 images, too few for one optimizer step .* = 64 images"):
        pipe.train(tiny_dataset(16), max_steps=1)


# -- files and directories ----------------------------------------------------------------


def test_run_dir_that_cannot_be_created_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    pipe = minild.Pipeline.from_config(tiny_config())
    with pytest.raises(UnwritableDirectoryError, match=rf"cannot write to the run directory {blocker / 'run'} .*--out"):
        pipe.train(tiny_dataset(32), run_dir=blocker / "run", max_steps=1)
    assert pipe.model.training is False  # refused before the model was touched


def test_read_only_output_directory_is_refused(tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if _can_write(read_only):
            pytest.skip("this user (root) writes into read-only directories")
        with pytest.raises(UnwritableDirectoryError, match=rf"cannot write to the output directory {read_only}"):
            check_writable_dir(read_only)
    finally:
        read_only.chmod(0o755)


def _can_write(directory) -> bool:
    try:
        (directory / "probe").write_text("")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def test_missing_pipeline_directory_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pipeline directory .*nowhere does not exist: give the directory"):
        minild.Pipeline.from_pretrained(tmp_path / "nowhere")


def test_pipeline_directory_without_weights_names_the_file(tmp_path):
    minild.Pipeline.from_config(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights file .*model.safetensors does not exist"):
        minild.Pipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_in_a_saved_pipeline_is_named(tmp_path, damage):
    minild.Pipeline.from_config(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 20)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file .* truncated or damaged"):
        minild.Pipeline.from_pretrained(tmp_path)


def test_damaged_checkpoint_manifest_is_skipped_for_the_previous_checkpoint(tmp_path):
    pipe = minild.Pipeline.from_config(tiny_config(train={"hooks": [{"name": "checkpoint", "every_steps": 1}]}))
    pipe.train(tiny_dataset(32), run_dir=tmp_path, max_steps=2)
    (tmp_path / "checkpoints" / "step-000002" / "trainer.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"step-000002: trainer.json is not valid JSON"):
        checkpoint.read_checkpoint(tmp_path / "checkpoints" / "step-000002")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert checkpoint.load_latest(tmp_path).step == 1


def test_resuming_with_another_model_config_is_refused(tmp_path):
    hooks = {"hooks": [{"name": "checkpoint", "every_steps": 1}]}
    minild.Pipeline.from_config(tiny_config(train=hooks)).train(tiny_dataset(32), run_dir=tmp_path, max_steps=1)
    wider = minild.Pipeline.from_config(tiny_config(model={"base_channels": 16}, train=hooks))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"step-000001.model.safetensors does not fit the configured SimpleUNet: .*another model config; "
        r"resume with the config it was trained with",
    ):
        wider.train(tiny_dataset(32), resume=tmp_path, max_steps=2)
