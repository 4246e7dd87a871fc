"""``train``: batching, precision, run length, checkpoints, EMA, and ``train.early_stopping``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from trainer.config.fields import ConfigError, Section, num


@dataclass
class EarlyStoppingConfig(Section):
    """Which validation metric selects the best checkpoint, and when training stops early (``trainer/train/early_stopping.py``)."""

    _where: ClassVar[str] = "train.early_stopping"

    monitor: str = "val/top1"
    """Metric compared after every evaluation: a ``val/...`` key of metrics.jsonl (``val/top1``,
    ``val/loss``, ``val/balanced_acc``, ``val/top5``; multi-label: ``val/mAP``, ``val/mAP_micro``, ``val/f1_micro``,
    ``val/f1_macro``, ``val/exact_set_accuracy``, ``val/hamming_loss``). ``checkpoints/best/`` is written whenever it
    improves. With ``data.task: multilabel`` the default ``val/top1`` (a single-label metric) becomes ``val/mAP``."""
    mode: Literal["auto", "max", "min"] = "auto"
    """``max``: higher is better; ``min``: lower is better; ``auto``: ``min`` for a name containing
    ``loss``, else ``max``."""
    patience: Optional[int] = num(None, ge=1)
    """Stop after this many evaluations in a row without improvement (null: never stop early)."""
    min_delta: float = num(0.0, ge=0)
    """An evaluation improves only if it beats the best so far by more than this (metric units)."""

    def _check(self) -> None:
        if not self.monitor.startswith("val/") or self.monitor == "val/":
            raise ConfigError(f"train.early_stopping.monitor: {self.monitor!r} is not allowed (allowed: a "
                              "validation metric 'val/...', e.g. val/top1, val/loss, val/balanced_acc, val/top5, val/mAP)")


@dataclass
class TrainConfig(Section):
    """Batching, precision, run length, checkpoints."""

    _where: ClassVar[str] = "train"

    epochs: int = num(3, ge=1)
    """Number of epochs (one epoch = the training split's sample count / global_batch_size steps); the run's
    length unless ``steps`` is set."""
    steps: Optional[int] = num(None, ge=1)
    """The run's length in optimizer steps, instead of ``epochs`` (the last epoch is then partial); the lr
    schedule (warm-up, then cosine to zero) is shaped over exactly these steps. Null: ``epochs`` passes."""
    time_budget: Optional[Union[float, str]] = None
    """Wall time for the whole command: ``20m``, ``2h``, ``1h30m``, ``90s`` or a number of seconds. With
    ``finetune.strategy: auto`` the planner (``trainer/planner/``) chooses backbone, input size, strategy and
    length to end inside it; with another strategy it sets only ``steps`` so the run ends inside it. Null: no
    budget (under Slurm, ``strategy: auto`` then plans to the job's end time). Range: 1 s to 30 days."""
    global_batch_size: int = num(32, ge=1)
    """Samples per optimizer step over all ranks = micro_batch_size x world_size x grad_accum_steps."""
    micro_batch_size: int = num(16, ge=1)
    """Samples per forward/backward pass on one rank."""
    eval_batch_size: Optional[int] = num(None, ge=1)
    """Per-rank batch size for evaluation (default: 2 x micro_batch_size)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast dtype (Accelerate). ``auto``: the launcher's ``bf16``/``fp16`` (``accelerate launch
    --mixed_precision``, ``ACCELERATE_MIXED_PRECISION``); else ``bf16`` where the hardware has native bf16 and it
    is faster: a GPU of compute capability >= 8.0, or, for a backbone frozen for the whole run (feature
    extraction, linear probe), a CPU with ``avx512_bf16`` or ``amx_bf16``; else ``no`` (float32, e.g.
    fine-tuning on any CPU). Rule and measurements: ``trainer/config/launcher.py``. Any other value wins over
    the launcher and the hardware. ``fp16`` needs a GPU and uses a gradient scaler. The value used is
    logged and recorded in ``config.yaml``."""
    seed: int = num(0, ge=0, lt=2**32)
    """Seed for weights of the head, shuffling and augmentation."""
    output_dir: str = "runs/default"
    """Run directory: config, metrics.jsonl, checkpoints; it holds one run. An existing run there is
    resumed if its config differs only in settings resuming may change (``trainer/checkpoint/run_folder.py``)."""
    resume: bool = True
    """Resume from the newest checkpoint in ``output_dir/checkpoints/`` if there is one. ``false`` into a
    folder holding a run is refused unless ``overwrite`` is set."""
    resume_from: Optional[str] = None
    """Resume from this kept checkpoint of ``output_dir`` instead of the newest: a file name in
    ``output_dir/checkpoints/`` (``step_000000400.pt``, ``last.pt``) or its path. The newer step checkpoints
    are deleted and ``metrics.jsonl`` is rewound to its step; a later start with the same value continues
    from the newest checkpoint (a requeued job does not go back again). Null: the newest."""
    overwrite: bool = False
    """With ``resume: false``: delete the run in ``output_dir`` first (only a run folder is ever deleted)."""
    checkpoint_every_steps: int = num(0, ge=0)
    """Also write the resume checkpoint every this many optimizer steps (0: only at epoch ends)."""
    checkpoint_every_minutes: float = num(0.0, ge=0)
    """Also write the resume checkpoint when this many minutes passed since the previous one (0: off)."""
    keep_checkpoints: int = num(1, ge=1)
    """Resume checkpoints kept: 1 keeps ``checkpoints/last.pt`` only (replaced at every write), k > 1 the k newest
    ``checkpoints/step_<step>.pt`` (``last.pt`` is then a hard link to the newest). An older step file is deleted
    only once a newer one is complete (``trainer/checkpoint/files.py``); ``checkpoints/best/`` is kept apart."""
    eval_every_steps: int = num(0, ge=0)
    """Also evaluate on the validation split every this many optimizer steps of the run (Lightning's
    ``val_check_interval`` as a step count); 0: only at epoch ends. Each evaluation is a ``metrics.jsonl``
    record with ``step`` and ``samples_seen``; ``checkpoints/best/`` and early stopping (patience counts
    evaluations) follow every evaluation."""
    log_every_steps: int = num(10, ge=1)
    """Log train loss, lr and images/s every this many optimizer steps."""
    max_steps: Optional[int] = num(None, ge=1)
    """Stop after this many optimizer steps in total (debugging, tests; null: no limit)."""
    dist_timeout_s: int = num(600, ge=1)
    """Timeout of collective operations (seconds)."""
    feature_cache: bool = False
    """Feature extraction speed-up (needs ``data.augment: none``): while the backbone is frozen entirely,
    the first epoch stores each rank's backbone features (train and val, in memory) and later epochs
    train and evaluate the head on them (``trainer.train.feature_cache``)."""
    feature_cache_max_ram_fraction: float = num(0.25, gt=0, le=1)
    """Share of the host's RAM (or cgroup limit) that the feature caches of a node's ranks may hold; beyond
    it the cache spills to memory-mapped files in ``output_dir/feature_cache``."""
    preempt_check_every_steps: int = num(1, ge=1)
    """Agree on preemption (and on ``checkpoint_every_minutes``) every this many optimizer steps: each
    check is an all-reduce that waits for the device; a signal then stops the run up to N-1 steps later."""
    ema_decay: Optional[float] = num(None, gt=0, lt=1)
    """Model EMA (timm ModelEmaV3 with its decay warm-up ``1 - (1 + step) ** (-2/3)``) with this largest
    decay, e.g. 0.999 for a few thousand steps; null: off. The EMA weights are evaluated beside the raw ones
    (``val_ema/top1``, ...); ``best.pt`` holds whichever is better on the monitored metric and records which
    (``metrics.weights: ema|raw``). The EMA is saved in ``last.pt`` and restored on resume."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Monitored metric (selects ``checkpoints/best/``) and early stopping, e.g.
    ``{monitor: val/top1, mode: max, patience: 3, min_delta: 0.0}``."""

    def _check(self) -> None:
        if self.time_budget is not None:
            from trainer.config.duration import parse_duration
            self.time_budget = parse_duration(self.time_budget, "train.time_budget")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")
        if not self.output_dir:
            raise ConfigError("train.output_dir: empty path is not allowed")
        if self.resume_from is not None and not self.resume_from:
            raise ConfigError("train.resume_from: empty path is not allowed (null: the newest checkpoint)")
        if self.resume_from and not self.resume:
            raise ConfigError("train.resume_from: needs train.resume: true")
