"""What the configured data looks like, read before anything is written: one function for the planner
(``finetune.strategy: auto``, ``train.time_budget``) and the dry run (``--dry_run``).

:func:`survey_data` reads the data the way a run will (:mod:`trainer.data.prepare`): ``data.train_shards``
-> ``data.meta``; ``data.manifest`` / ``data.root`` -> listed as the shard writer will list it
(:func:`trainer.data.prepare.build_listing`: folders, manifests, the split rule included); else
``shard_dir/dataset.json``. It opens the headers of a sample of training images for their sizes and tells
whether the run must write shards. Nothing is written.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config.schema import ConfigError, DataConfig
from trainer.data.listing import DataError, printable
from trainer.data.meta import read_meta
from trainer.data.prepare import build_listing, source_change

SIZE_SAMPLE = 64
"""Training images whose header is read for the source size (evenly spaced over the listing)."""

MAX_CLASSES_SHOWN = 10
"""Class names printed by :meth:`DataSurvey.line`; the rest are counted (``... (N more)``)."""


@dataclass(frozen=True)
class DataSurvey:
    """The configured data, before anything is written.

    Attributes:
        classes: class names in label order. class_counts: training images per class (multi-label: the
            training images carrying each class).
        num_train, num_val, num_test: images per split (``num_test`` 0 without a test split).
        source_side: median short side (pixels) of the sampled training images; None when unknown
            (existing shards, or ``image_sizes=False``: the planner then assumes the backbone's pretraining size).
        write_shards: images the run must write into shards before training (0: the shards are reused).
        split_sizes: split name -> images, for every split the source has (listed files, or ``dataset.json``'s
            samples). source: where they were read from (``"listing of data/x"``, ``"data/shards/dataset.json"``).
    """

    classes: tuple[str, ...]
    class_counts: tuple[int, ...]
    num_train: int
    num_val: int
    num_test: int
    source_side: int | None
    write_shards: int
    split_sizes: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def imbalance(self) -> float:
        """Largest over smallest class count of the training split (1.0: balanced)."""
        return max(self.class_counts) / max(1, min(self.class_counts))

    def to_dict(self) -> dict:
        """Plain dict for ``plan.json`` (without the class names, which ``dataset.json`` holds, and without
        ``split_sizes`` / ``source``)."""
        return {"class_counts": list(self.class_counts), "num_train": self.num_train, "num_val": self.num_val,
                "num_test": self.num_test, "source_side": self.source_side, "write_shards": self.write_shards,
                "num_classes": len(self.classes)}

    def line(self, limit: int = MAX_CLASSES_SHOWN) -> str:
        """One line: ``data (<source>): N classes: a, b, ... (M more); splits: train 80, val 20``."""
        names = ", ".join(printable(c) for c in self.classes[:limit])
        if len(self.classes) > limit:
            names += f", ... ({len(self.classes) - limit} more)"
        splits = ", ".join(f"{s} {n}" for s, n in self.split_sizes.items())
        return f"data ({self.source}): {len(self.classes)} classes: {names}; splits: {splits}"


def _short_sides(files: list[str]) -> list[int]:
    from PIL import Image

    sides = []
    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - a bad image is the shard writer's to report, not the survey's
            continue
    return sides


def _from_meta(path: Path) -> DataSurvey:
    meta = read_meta(path)
    sp = meta.splits
    n = {s: sp[s].num_samples if s in sp else 0 for s in ("train", "val", "test")}
    counts = tuple(sp["train"].class_counts) if "train" in sp else tuple(0 for _ in meta.classes)
    return DataSurvey(tuple(meta.classes), counts, n["train"], n["val"], n["test"], None, 0,
                      {s: m.num_samples for s, m in sp.items()}, str(path))


def survey_data(cfg: DataConfig, *, download: bool = True, image_sizes: bool = True) -> DataSurvey:
    """Survey the data ``cfg`` names (see the module docstring). Writes nothing.

    Args:
        download: let a configured ``data.download_url`` run when ``data.root`` does not exist yet (False:
            refuse, naming the field; the dry run downloads nothing).
        image_sizes: open a sample of :data:`SIZE_SAMPLE` training image headers for ``source_side``.

    Raises:
        ConfigError: the data cannot be read (names the field, folder, file or row).
    """
    meta = Path(cfg.meta or Path(cfg.shard_dir) / "dataset.json")
    if cfg.train_shards is not None or (cfg.manifest is None and cfg.root is None and meta.is_file()):
        if not meta.is_file():
            raise ConfigError(f"data.meta: {meta} not found")
        return _from_meta(meta)
    if not download and cfg.manifest is None and (cfg.root is None or not Path(cfg.root).is_dir()):
        where = "data.root: not set" if cfg.root is None else f"data.root: folder not found: {cfg.root}"
        raise ConfigError(where + (" (this command downloads nothing)" if cfg.download_url else ""))
    try:
        listing = build_listing(cfg)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if listing is None:  # existing shards, used as they are
        return _from_meta(meta)
    train = listing.splits.get("train", [])
    sides = []
    if image_sizes:
        step = max(1, len(train) // SIZE_SAMPLE)
        sides = _short_sides([it.file for it in train[::step][:SIZE_SAMPLE]])
    out = Path(cfg.shard_dir)
    write = sum(len(v) for v in listing.splits.values())
    if (out / "dataset.json").is_file():
        try:
            if source_change(read_meta(out).source, listing.source, str(out)) is None:
                write = 0
        except (ConfigError, DataError, OSError, ValueError):
            pass  # the data layer reports it, with its own message, when the run prepares the data
    src = (cfg.root or cfg.download_url) if cfg.manifest is None else (
        cfg.manifest if isinstance(cfg.manifest, str) else ", ".join(map(str, dict(cfg.manifest).values())))
    return DataSurvey(tuple(listing.classes), tuple(listing.class_counts("train")),
                      len(train), len(listing.splits.get("val", [])), len(listing.splits.get("test", [])),
                      int(statistics.median(sides)) if sides else None, write,
                      {s: len(items) for s, items in listing.splits.items()}, f"listing of {src}")
