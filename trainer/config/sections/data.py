"""``data``: where the images come from (folder, manifest, download), the shards, the loader and
the training augmentation (crop, RandAugment, mixup/cutmix, random erasing)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from trainer.config.fields import ConfigError, Section, num

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
    task: Literal["multiclass", "multilabel"] = "multiclass"
    """``multiclass``: one label per image. ``multilabel``: a set of labels per image (0, 1 or more; a
    manifest only, ``docs/data.md#multi-label``); never guessed from the data."""
    label_delimiter: str = "|"
    """``task: multilabel``: the text between labels in one label cell (``river|forest``); non-empty."""
    label_columns: Optional[Union[Literal["rest"], list[Union[int, str]]]] = None
    """``task: multilabel``: one 0/1 column per class instead of a label column: a list of column names
    (or 0-based indices), or ``rest`` (every column but the path and split columns); the class names are
    the column names (default: unset, the labels are in ``label_column``)."""
    val_fraction: Optional[float] = num(None, gt=0, lt=1)
    """Class folders without a split (``root/<class>/<image>``): fraction in (0, 1) of each class held out
    for validation; stratified, fixed by the sorted file names and ``split_seed``, recorded in ``dataset.json``.
    Also a ``task: multilabel`` manifest without val rows: split by iterative stratification."""
    test_fraction: float = num(0.0, ge=0, lt=1)
    """With ``val_fraction``: fraction in [0, 1) of each class (multi-label manifests: of the rows, stratified
    like val) held out as the test split (0: none)."""
    split_seed: int = 0
    """Seed of the stratified split of class folders or of a multi-label manifest (changing it later is
    refused, like the fractions)."""
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
        if self.manifest is not None and self.val_fraction is not None and self.task == "multiclass":
            raise ConfigError("data.val_fraction: a manifest gives its own splits (split column or one file per split)")
        if not self.label_delimiter:
            raise ConfigError("data.label_delimiter: '' is not allowed (allowed: a non-empty string)")
        if self.task == "multiclass" and self.label_columns is not None:
            raise ConfigError(f"data.label_columns: {self.label_columns!r} needs data.task: multilabel (one 0/1 "
                              "column per class)")
        if self.task == "multilabel":
            if self.root is not None:
                raise ConfigError("data.task: multilabel needs data.manifest (CSV/JSONL); folder layouts "
                                  f"(data.root {self.root}) give one label per image")
            if self.label_columns is not None and self.label_column is not None:
                raise ConfigError("data.label_columns: set either data.label_column (labels in one column) or "
                                  "data.label_columns (one 0/1 column per class), not both")
            cols = self.label_columns
            if isinstance(cols, list) and (not cols or len(set(map(str, cols))) != len(cols)
                                           or any(isinstance(c, int) and c < 0 for c in cols)):
                raise ConfigError(f"data.label_columns: {self.label_columns!r} is not allowed (allowed: a non-empty "
                                  "list of distinct column names or indices, or 'rest')")
        cs = self.crop_scale
        if len(cs) != 2 or not 0.0 < cs[0] <= cs[1] <= 1.0:
            raise ConfigError(f"data.crop_scale: {cs} is not allowed (allowed: [min, max] with 0 < min <= max <= 1)")
