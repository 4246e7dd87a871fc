"""Loading a config: YAML file + ``--section.key=value`` overrides -> checked :class:`Config`; saving it."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from trainer.config.schema import Config, ConfigError
from trainer.utils.files import atomic_write

# ---------------------------------------------------------------------------------------------
# type checking and merging


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected string, got {type(value).__name__} {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (valid keys{' in ' + prefix if prefix else ''}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: dict) -> dict:
    """Turn ``{"optim.lr": 3e-4, "train.epochs": 2}`` into a nested dict.

    Values that arrive as strings are parsed as YAML (``"1e-3"`` -> 1e-3, ``"[1, 2]"`` -> list), so
    overrides given by ``fire`` or by a shell script behave the same.

    Raises:
        ConfigError: a key with an empty part (``--optim..lr``).
    """
    nested: dict = {}
    for dotted, value in overrides.items():
        parts = dotted.replace("-", "_").split(".")
        if any(not p for p in parts):
            raise ConfigError(f"bad override key '{dotted}'")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                pass
            if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and dotted overrides.

    Args:
        path: YAML file with the same sections as :class:`Config` (only the differences).
        overrides: ``{"section.key": value}`` applied after the file.

    Raises:
        ConfigError: unreadable or malformed file (names it), unknown key or wrong type (names the key),
            or inconsistent batch sizes.
    """
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections, got {type(loaded).__name__}")
        values = loaded
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides))
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than one field. Raises ConfigError naming the fields."""
    t = cfg.train
    for key in ("global_batch_size", "micro_batch_size", "epochs"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {getattr(t, key)}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({t.micro_batch_size})")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {cfg.optim.label_smoothing}")
    f = cfg.finetune
    if f.layer_decay is not None and f.layer_lr_scale is not None:
        raise ConfigError("finetune.layer_decay and finetune.layer_lr_scale are mutually exclusive")
    if f.layer_decay is not None and not 0.0 < f.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {f.layer_decay}")
    es = t.early_stopping
    if not es.monitor.startswith("val/"):
        raise ConfigError(f"train.early_stopping.monitor must be a validation metric 'val/...', got {es.monitor!r}")
    if es.patience is not None and es.patience < 1:
        raise ConfigError(f"train.early_stopping.patience must be >= 1 or null, got {es.patience}")
    if es.min_delta < 0:
        raise ConfigError(f"train.early_stopping.min_delta must be >= 0, got {es.min_delta}")
    if not 0.0 <= cfg.optim.class_weights_beta < 1.0:
        raise ConfigError(f"optim.class_weights_beta must be in [0, 1), got {cfg.optim.class_weights_beta}")
    if not 0 < t.feature_cache_max_ram_fraction <= 1:
        raise ConfigError(f"train.feature_cache_max_ram_fraction must be in (0, 1], got {t.feature_cache_max_ram_fraction}")
    if t.feature_cache and cfg.data.augment != "none":
        raise ConfigError(f"train.feature_cache needs data.augment=none (random augmentation changes the "
                          f"features every epoch), got data.augment={cfg.data.augment!r}")
    if t.preempt_check_every_steps < 1:
        raise ConfigError(f"train.preempt_check_every_steps must be >= 1, got {t.preempt_check_every_steps}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: global_batch_size / (micro_batch_size x world_size).

    Raises:
        ConfigError: the global batch is not divisible by micro_batch_size x world_size (names all three).
    """
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x world_size ({world_size})")
    return cfg.train.global_batch_size // per_step


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the file ``load_config`` reads back to the same Config)."""
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    return _build(Config, values, "")


