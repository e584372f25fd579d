"""Config validation at the edge: unknown keys and wrong types name the key and the file."""

from __future__ import annotations

import pytest
import yaml

from minild.config import ConfigError, load_config
from tests.conftest import tiny_config


def write(tmp_path, config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_configs_load():
    for name in ("digits_ddpm", "digits_class_cfg", "digits_text_cfg"):
        config = load_config(f"configs/{name}.yaml")
        assert config.model.name and config.schedule.name and config.sampler.name


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {**tiny_config(), "shedule": {"name": "linear"}})
    with pytest.raises(ConfigError, match=rf"{path}: unknown key shedule \(did you mean 'schedule'\?\)"):
        load_config(path)


def test_unknown_stage_param_names_key_and_lists_accepted(tmp_path):
    path = write(tmp_path, tiny_config(model={"base_chanels": 8}))
    suggestion = r"\(did you mean 'base_channels'\?\)"
    with pytest.raises(ConfigError, match=rf"{path}: unknown key model.base_chanels {suggestion}; model accepts: .*base_channels"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, tiny_config(schedule={"num_timesteps": "1000"}))
    with pytest.raises(ConfigError, match=rf"{path}: schedule.num_timesteps must be int, got '1000'"):
        load_config(path)


def test_wrong_type_in_train_section(tmp_path):
    path = write(tmp_path, tiny_config(train={"batch_size": 1.5}))
    with pytest.raises(ConfigError, match=rf"{path}: train.batch_size must be int"):
        load_config(path)


def test_unknown_stage_name_lists_available(tmp_path):
    path = write(tmp_path, tiny_config(sampler={"name": "ddimm"}))
    suggestion = r"\(did you mean 'ddim'\?\)"
    with pytest.raises(ConfigError, match=rf"{path}: sampler.name: unknown sampler 'ddimm' {suggestion}; available: .*ddim"):
        load_config(path)


def test_missing_section(tmp_path):
    config = tiny_config()
    del config["model"]
    with pytest.raises(ConfigError, match="missing section 'model'"):
        load_config(write(tmp_path, config))


def test_unknown_trainer_hook_param(tmp_path):
    path = write(tmp_path, tiny_config(train={"hooks": [{"name": "ema", "decoy": 0.9}]}))
    with pytest.raises(ConfigError, match=r"unknown key train.hooks\[0\].decoy"):
        load_config(path)


def test_int_is_accepted_where_float_is_expected():
    config = load_config(tiny_config(train={"lr": 1}))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(tiny_config())
    config.dump(tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == config
