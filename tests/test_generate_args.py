"""``Pipeline.generate`` and ``minild sample`` check every argument: one ``ValueError`` naming it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import yaml

import minild
from minild.cli import main, parse_guidance

CONFIG = {
    "schedule": {"name": "linear", "num_timesteps": 100},
    "model": {"name": "simple_unet", "in_channels": 1, "base_channels": 8, "channel_mults": [1, 2],
              "time_embedding_dim": 16, "norm_groups": 4, "num_classes": 3},
    "sampler": {"name": "ddim", "num_inference_steps": 2},
    "image_shape": [1, 8, 8],
    "train": {"hooks": [], "device": "cpu"},
}


@pytest.fixture(scope="module")
def pipe():
    return minild.Pipeline.from_config(CONFIG)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


BAD_ARGUMENTS = [
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number"),
    ({"guidance_scale": math.inf}, "guidance_scale must be a finite number"),
    ({"guidance_scale": "3"}, "guidance_scale must be a finite number"),
    ({"guidance_scale": True}, "guidance_scale must be a finite number"),
    ({"guidance": "apgg"}, r"generate\(\): guidance.name: unknown guidance 'apgg' \(did you mean 'apg'\?\)"),
    ({"guidance": {"name": "apg", "momentm": 0.1}}, r"unknown key guidance.momentm \(did you mean 'momentum'\?\)"),
    ({"guidance": 3.0}, "guidance must be a stage name or a mapping"),
    ({"class_labels": [3.5]}, r"class_labels\[0\] is 3.5"),
    ({"class_labels": [True]}, r"class_labels\[0\] is True"),
    ({"class_labels": ["1"]}, r"class_labels\[0\] is '1'"),
    ({"class_labels": "12"}, "class_labels must be integers, got the string"),
    ({"class_labels": torch.tensor([0.5, 1.0])}, "class_labels must be whole numbers"),
    ({"class_labels": torch.tensor([True])}, "class_labels must be integers, got a torch.bool tensor"),
    ({"class_labels": []}, "class_labels is empty"),
    ({"class_labels": [3]}, r"class_labels must lie in \[0, 3\), got \[3\]"),
    ({"class_labels": [-1]}, r"class_labels must lie in \[0, 3\)"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
    ({"num_inference_steps": True}, "num_inference_steps must be a positive integer"),
    ({"num_inference_steps": 2.0}, "num_inference_steps must be a positive integer"),
    ({"num_images": 0}, "num_images must be a positive integer"),
    ({"num_images": "4"}, "num_images must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer or None"),
    ({"batch_size": False}, "batch_size must be a positive integer or None"),
    ({"prompts": []}, "prompts is an empty list"),
    ({"prompts": ["a", 3]}, "prompts must be a string or a list of strings"),
    ({"prompts": "seven"}, "is not text-conditioned"),
    ({"generator": 0}, "generator must be a torch.Generator or a list of them"),
    ({"generator": [torch.Generator()], "num_images": 2}, "got 1 generators for 2 images"),
    ({"generator": torch.Generator(), "seed": 1}, "pass either generator or seed, not both"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"seed": 2**70}, r"seed must lie in \[0, 2\*\*64\), got 1180591620717411303424$"),
    ({"seed": -1}, r"seed must lie in \[0, 2\*\*64\), got -1: torch would wrap a negative seed onto another one"),
    ({"latents": torch.zeros(2, 1, 4, 4)}, r"latents must have shape \(2, 1, 8, 8\)"),
    ({"latents": torch.full((1, 1, 8, 8), math.nan)}, "latents has NaN or inf entries"),
    ({"latents": np.zeros((1, 1, 8, 8))}, "latents must be a float tensor"),
    ({"latents": torch.zeros(1, 1, 8, 8, dtype=torch.long)}, "latents must be a float tensor"),
    ({"output_type": "png"}, "output_type must be 'pt', 'np' or 'pil'"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
    ({"device": 0}, "device must be a string"),
    ({"use_ema": "no"}, "use_ema must be True or False"),
    ({"callback": "print"}, "callback must be callable"),
    ({"sampler": "ddimm"}, r"generate\(\): sampler.name: unknown sampler 'ddimm'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS, ids=[f"{i}-{next(iter(k))}" for i, (k, _) in
                                                                     enumerate(BAD_ARGUMENTS)])
def test_a_bad_argument_is_one_value_error_naming_it(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(**kwargs)


def test_integral_labels_of_any_integer_kind_are_taken(pipe):
    expected = pipe.generate(class_labels=[0, 2], seed=0)
    for labels in ([0.0, 2.0], np.array([0, 2]), torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0.0, 2.0]),
                   [np.int64(0), np.int64(2)]):
        assert torch.equal(pipe.generate(class_labels=labels, seed=0), expected), labels
    assert pipe.generate(class_labels=1, seed=0).shape == (1, 1, 8, 8)


def test_a_list_of_generators_and_a_device_object_are_taken(pipe):
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    images = pipe.generate(class_labels=[0, 1], generator=generators, device=torch.device("cpu"))
    assert images.shape == (2, 1, 8, 8)


def test_parse_guidance_reads_numbers_and_booleans():
    assert parse_guidance("apg") == {"name": "apg"}
    assert parse_guidance("cfg_interval:scale=3,sigma_low=0.3") == {"name": "cfg_interval", "scale": 3,
                                                                     "sigma_low": 0.3}
    assert parse_guidance("x: flag = true, other=null, word=abc, small=1e-3") == {
        "name": "x", "flag": True, "other": None, "word": "abc", "small": 0.001}
    for bad in (":scale=3", "apg:scale", "apg:=3"):
        with pytest.raises(ValueError, match="--guidance"):
            parse_guidance(bad)


@pytest.fixture(scope="module")
def run_dir(pipe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    pipe.save_pretrained(directory)
    return directory


def test_sample_takes_a_guidance_with_params(run_dir, tmp_path, monkeypatch):
    seen = []
    original = minild.Pipeline.generate
    monkeypatch.setattr(minild.Pipeline, "generate", lambda self, *a, **k: seen.append(k) or original(self, *a, **k))
    out = tmp_path / "grid.png"
    args = ["sample", str(run_dir), "--num", "3", "--class-label", "1", "--out", str(out)]
    assert main([*args, "--guidance", "cfg_interval:scale=3,sigma_low=0.3"]) == 0
    assert seen[-1]["guidance"] == {"name": "cfg_interval", "scale": 3, "sigma_low": 0.3}
    assert seen[-1]["guidance_scale"] is None and seen[-1]["num_inference_steps"] is None
    assert main([*args, "--guidance-scale", "2"]) == 0
    assert seen[-1]["guidance"] is None and seen[-1]["guidance_scale"] == 2.0
    assert out.is_file()


@pytest.mark.parametrize(("flags", "message"), [
    (["--guidance", "apg:scale"], "'scale' is not KEY=VALUE"),
    (["--guidance", "apgg"], "unknown guidance 'apgg'"),
    (["--guidance", "apg:momentum=3"], "apg momentum must lie in"),
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    (["--steps", "0"], "num_inference_steps must be a positive integer"),
    (["--num", "0"], "--num must be a positive number of images"),
    (["--class-label", "7"], r"class_labels must lie in \[0, 3\)"),
    (["--seed", "-1"], r"seed must lie in \[0, 2\*\*64\), got -1: torch would wrap"),
])
def test_sample_refuses_bad_options_in_one_line(run_dir, tmp_path, capsys, flags, message):
    assert main(["sample", str(run_dir), "--num", "2", "--out", str(tmp_path / "grid.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minild: error:") and err.count("\n") == 1
    assert re.search(message, err), err


def test_train_grid_uses_the_config_guidance_unless_a_scale_is_given(tmp_path, monkeypatch):
    from tests.conftest import tiny_config

    seen = []
    original = minild.Pipeline.generate
    monkeypatch.setattr(minild.Pipeline, "generate", lambda self, *a, **k: seen.append(k) or original(self, *a, **k))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(guidance={"name": "apg", "scale": 2.0},
                                                 model={"num_classes": 10})))
    args = ["train", str(config), "--out", str(tmp_path / "run"), "--max-steps", "1", "--grid", "2"]
    assert main(args) == 0
    assert seen[-1]["guidance_scale"] is None and seen[-1].get("guidance") is None  # the config's apg at 2.0
    assert main([*args, "--overwrite", "--guidance-scale", "4"]) == 0  # a finished run is not re-trained
    assert seen[-1]["guidance_scale"] == 4.0
