"""Dry run: the parameter-group table of a config, without data loading or training.

``python trainer/main.py --config configs/x.yaml --dry_run`` prints, for every optimizer group
(layer id x weight-decay class), its layer name, parameter count, peak lr, weight decay, and whether
it trains in each phase of the unfreeze timetable. Nothing is downloaded: the backbone is built
with random weights (the table depends only on the architecture).

The head size is read from the data the config names, in the order a run reads it
(:mod:`trainer.data.prepare`): ``data.train_shards`` -> ``dataset.json``; ``data.manifest`` / ``data.root``
-> listed (:mod:`trainer.data.listing`, :mod:`trainer.data.manifest`); else ``shard_dir/dataset.json``.
Nothing is written or downloaded. The first line says ``N classes: a, b, ...`` and the split sizes, or
that the data cannot be read (and why); the table then assumes 2 classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import Config, ConfigError, DataConfig
from trainer.data.listing import DataError, printable
from trainer.data.meta import read_meta
from trainer.data.prepare import build_listing
from trainer.finetune.freezing import trainable_layer_ids
from trainer.finetune.param_groups import build_param_groups, format_group_table
from trainer.finetune.schedule import build_phases_for
from trainer.models.build import build_model
from trainer.models.layers import group_names, layer_ids

MAX_CLASSES_SHOWN = 10
"""Class names printed on the dry run's data line; the rest are counted (``... (N more)``)."""


@dataclass(frozen=True)
class DataSummary:
    """What the dry run found of the configured data.

    Attributes:
        classes: class names in label order, or None when the data cannot be read.
        split_sizes: split name -> number of images (listed files, or ``dataset.json``'s samples).
        source: where they were read from (``"listing of data/x"``, ``"data/shards/dataset.json"``), or
            why nothing could be read (one line).
    """

    classes: list[str] | None
    split_sizes: dict[str, int]
    source: str

    def line(self, limit: int = MAX_CLASSES_SHOWN) -> str:
        """One line: ``data (<source>): N classes: a, b, ... (M more); splits: train 80, val 20``."""
        if self.classes is None:
            return f"data: cannot be read ({self.source}); the table below assumes 2 classes"
        names = ", ".join(printable(c) for c in self.classes[:limit])
        if len(self.classes) > limit:
            names += f", ... ({len(self.classes) - limit} more)"
        splits = ", ".join(f"{s} {n}" for s, n in self.split_sizes.items())
        return f"data ({self.source}): {len(self.classes)} classes: {names}; splits: {splits}"


def _from_meta(path: Path) -> DataSummary:
    meta = read_meta(path)
    return DataSummary(meta.classes, {s: m.num_samples for s, m in meta.splits.items()}, str(path))


def read_data_summary(data: DataConfig) -> DataSummary:
    """The class list and split sizes of the data ``data`` names, read without writing or downloading.

    Never raises for data that cannot be read: the reason (a missing folder, a bad manifest row, a
    source that would be downloaded) is :attr:`DataSummary.source` with ``classes`` None.
    """
    meta = Path(data.meta or Path(data.shard_dir) / "dataset.json")
    try:
        if data.train_shards is not None or (data.manifest is None and data.root is None and meta.is_file()):
            if not meta.is_file():
                return DataSummary(None, {}, f"data.meta: {meta} not found")
            return _from_meta(meta)
        if data.manifest is None and (data.root is None or not Path(data.root).is_dir()):
            where = "data.root: not set" if data.root is None else f"data.root: folder not found: {data.root}"
            return DataSummary(None, {}, where + (" (--dry_run downloads nothing)" if data.download_url else ""))
        listing = build_listing(data)
        src = data.root if data.manifest is None else (
            data.manifest if isinstance(data.manifest, str) else ", ".join(map(str, dict(data.manifest).values())))
        return DataSummary(list(listing.classes), {s: len(items) for s, items in listing.splits.items()},
                           f"listing of {src}")
    except (ConfigError, DataError, OSError, ValueError) as e:
        return DataSummary(None, {}, " ".join(str(e).split()))


def group_table(cfg: Config, num_classes: int | None = None) -> str:
    """The dry-run text for ``cfg`` (see module docstring): the data line, the phases and the group table.

    Args:
        num_classes: head size; default: the class count of :func:`read_data_summary` (2 when the data
            cannot be read). Given, no data is read and the data line is left out.
    """
    head = ""
    if num_classes is None:
        summary = read_data_summary(cfg.data)
        num_classes = len(summary.classes) if summary.classes is not None else 2
        head = summary.line() + "\n"
    model, _ = build_model(cfg.model.backbone, num_classes, "none", drop_rate=cfg.model.drop_rate)
    layer_of, num_layers = layer_ids(model, cfg.model.backbone)
    names = group_names(model, cfg.model.backbone)
    phases = build_phases_for(cfg, num_layers)
    lr_scale = None
    if cfg.finetune.layer_lr_scale is not None:
        lr_scale = {int(k): float(v) for k, v in cfg.finetune.layer_lr_scale.items()}
    params = dict(model.named_parameters())
    groups = build_param_groups([(n, tuple(p.shape)) for n, p in params.items()], layer_of, num_layers,
                                weight_decay=cfg.optim.weight_decay, layer_decay=cfg.finetune.layer_decay,
                                layer_lr_scale=lr_scale)
    for g in groups:
        g["name"] = f"{g['name']} ({names[g['layer_id']]})"
    table = format_group_table(groups, {n: p.numel() for n, p in params.items()}, cfg.optim.lr,
                               [trainable_layer_ids(p, num_layers) for p in phases])
    timeline = "\n".join(f"  phase{i}: from epoch {p.start_epoch}: train={p.train} lr_scale={p.lr_scale} "
                         f"warmup_steps={p.warmup_steps}" for i, p in enumerate(phases))
    return (f"{head}backbone {cfg.model.backbone}: {num_layers} layer ids (0 = stem, {num_layers - 1} = head), "
            f"{num_classes} classes\nphases:\n{timeline}\n{table}")


def print_group_table(cfg: Config) -> None:
    """Print :func:`group_table`."""
    print(group_table(cfg))


