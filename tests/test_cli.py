"""The `minild` command line: train → sample, and errors as messages with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from PIL import Image

import minild
from minild.cli import main
from minild.config import ConfigError
from minild.pipeline.grids import grid_conditions
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


def test_train_then_sample_writes_pngs(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--max-steps", "2", "--grid", "4"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert Image.open(run / "samples.png").size[0] > 28
    assert main(["sample", str(run), "--num", "9", "--steps", "3", "--sampler", "ddim", "--eta", "1.0",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert min(Image.open(tmp_path / "grid.png").size) > 3 * 2 * 30  # 3 × 3 digits, enlarged, under a title


def test_bad_config_is_reported_with_exit_code_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tiny_config(model={"depth": "deep"})))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "minild: error:" in capsys.readouterr().err


def test_sample_from_a_missing_run_is_reported(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert "pipeline directory" in capsys.readouterr().err


def test_user_error_is_one_line_and_debug_raises_it(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({**tiny_config(), "shedule": {"name": "linear"}}))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith(f"minild: error: {config}: unknown key shedule (did you mean 'schedule'?)")
    assert lines[0].endswith("(run `minild --debug ...` for the traceback)")
    with pytest.raises(ConfigError, match="unknown key shedule"):
        main(["--debug", "train", str(config), "--out", str(tmp_path / "run")])


def test_unwritable_output_is_one_line_naming_the_directory(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", str(config), "--out", str(blocker / "run"), "--max-steps", "1", "--grid", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write to the run directory {blocker / 'run'}" in err


def test_debug_flag_prints_the_traceback_from_the_command_line(tmp_path):
    missing = str(tmp_path / "nothing")
    plain = subprocess.run([sys.executable, "-m", "minild.cli", "sample", missing], capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "minild.cli", "--debug", "sample", missing],
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith(f"minild: error: pipeline directory {missing} does not exist")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: pipeline directory")


def test_class_conditional_grid_has_one_column_per_class(tmp_path):
    config = tmp_path / "class.yaml"
    config.write_text(yaml.safe_dump(tiny_config(model={"num_classes": 10})))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--max-steps", "1", "--grid", "20"]) == 0
    width, height = Image.open(run / "samples.png").size
    assert width > 10 * 2 * 30 and 2 * 2 * 30 < height < width / 2  # 2 rows of 10 labelled columns


def test_text_conditioned_grid_prompts_one_digit_per_column(tmp_path, tiny_clip_dir, offline):
    config = tiny_config(
        model={"cross_attention_dim": 32},
        text_encoder={"name": "clip", "pretrained": str(tiny_clip_dir), "max_length": 8},
        data={"prompt_templates": ["a handwritten digit {name}", "{label}"]},
    )
    pipe = minild.Pipeline.from_config(config)
    prompts = grid_conditions(pipe, 12)["prompts"]
    assert prompts[:3] == ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit two"]
    assert prompts[10] == "a handwritten digit zero"
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--max-steps", "1", "--grid", "20"]) == 0
    width, height = Image.open(run / "samples.png").size
    assert width > 10 * 2 * 30 and height > 2 * 2 * 30 + 100  # 10 columns under their upright prompts
