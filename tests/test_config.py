"""Config loading: defaults, YAML, overrides, and errors that name the key."""

import pytest

from trainer.config.loading import (
    config_from_dict,
    grad_accum_steps,
    load_config,
    save_config,
)
from trainer.config.schema import Config, ConfigError, Phase


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_layer_over_defaults(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.01\ntrain:\n  epochs: 5\n")
    cfg = load_config(p, {"optim.lr": "3e-4", "finetune.phases": "[{start_epoch: 0, train: head}]"})
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 5
    assert cfg.finetune.phases == [Phase(0, "head")]
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(write(tmp_path, "optim:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"'bogus'"):
        load_config(None, {"bogus.x": 1})


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got str 'fast'"):
        load_config(write(tmp_path, "optim:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int"):
        load_config(None, {"train.epochs": 2.5})
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: 'fp8' is not allowed \(allowed: .*bf16"):
        load_config(None, {"train.mixed_precision": "fp8"})


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [\n"))


def test_batch_sizes_and_grad_accum():
    cfg = load_config(None, {"train.global_batch_size": 32, "train.micro_batch_size": 8})
    assert grad_accum_steps(cfg, 1) == 4
    assert grad_accum_steps(cfg, 2) == 2
    with pytest.raises(ConfigError, match=r"world_size \(3\)"):
        grad_accum_steps(cfg, 3)
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, {"train.global_batch_size": 30, "train.micro_batch_size": 8})


def test_roundtrip_through_saved_yaml(tmp_path):
    cfg = load_config(None, {"optim.lr": 0.5, "finetune.layer_decay": 0.7})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
