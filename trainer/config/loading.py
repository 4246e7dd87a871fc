"""Loading a config: YAML file + ``--section.key=value`` overrides -> checked :class:`Config`; saving it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from trainer.config.fields import from_dict
from trainer.config.schema import Config, ConfigError
from trainer.files.atomic import atomic_write

# ---------------------------------------------------------------------------------------------
# YAML as a user means it


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 scalars: ``1e-3`` and ``5e-4`` are floats, only true/false are
    booleans (``no``, ``off``, ``on``, ``yes`` stay strings; boolean fields accept them, see
    :func:`trainer.config.fields.coerce`)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (_BOOL, _FLOAT)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YamlLoader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_load(text: str):
    """Parse YAML text with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: dict, parse_strings: bool = True) -> dict:
    """Turn ``{"optim.lr": 3e-4, "train.epochs": 2}`` into a nested dict.

    Values that arrive as strings are parsed as YAML 1.2 (``"1e-3"`` -> 1e-3, ``"[1, 2]"`` -> list, ``"no"``
    stays ``"no"``), so overrides given by a shell script or Python behave as on the command line. With
    ``parse_strings=False`` values are taken as they are (the command line's parser, ``trainer/cli/args.py``,
    has read each text by its field's type already: a ``str`` field keeps ``007``).

    Raises:
        ConfigError: a key with an empty part (``--optim..lr``).
    """
    nested: dict = {}
    for dotted, value in overrides.items():
        parts = dotted.replace("-", "_").split(".")
        if any(not p for p in parts):
            raise ConfigError(f"bad override key '{dotted}'")
        if parse_strings and isinstance(value, str):
            try:
                value = yaml_load(value) if value.strip() else value
            except yaml.YAMLError:
                pass
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: dict | None = None, *,
                parse_strings: bool = True) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and dotted overrides.

    Args:
        path: YAML file with the same sections as :class:`Config` (only the differences).
        overrides: ``{"section.key": value}`` applied after the file.
        parse_strings: read string override values as YAML (:func:`parse_overrides`).

    Raises:
        ConfigError: unreadable or malformed file (names it), unknown key, wrong type, value out of its
            range or fields that contradict each other (names the keys; checked by the sections themselves,
            ``trainer/config/sections/``, and by ``trainer/config/schema.py``).
    """
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections, got {type(loaded).__name__}")
        values = loaded
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides, parse_strings))
    return from_dict(Config, values, "")


def no_config_defaults(values: dict) -> dict:
    """The defaults of a run started without a config file (``finetune --data.root=PATH --train.time_budget=15m``)
    under the command line's ``values`` (``{"section.key": value}``): ``finetune.strategy: auto`` (the planner
    chooses the rest) and a shard folder of the data's own, ``data/shards/<name of data.root or the manifest>``,
    so two datasets never share one (unless ``data.shard_dir`` is given)."""
    out = {"finetune.strategy": "auto"}
    source = values.get("data.root") or values.get("data.manifest")
    if isinstance(source, str) and source.strip() and "data.shard_dir" not in values:
        name = Path(source.rstrip("/\\")).name
        name = Path(name).stem if Path(name).suffix.lower() in (".csv", ".jsonl", ".json") else name
        out["data.shard_dir"] = str(Path("data/shards") / (name or "data"))
    return {**out, **values}


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
    return from_dict(Config, values, "")
