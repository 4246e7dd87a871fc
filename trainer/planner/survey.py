"""What the data looks like, read before anything is written: the planner's first input.

:func:`survey_data` lists the configured source the way the shard writer will (``trainer.data.prepare.
build_listing``: folders, manifests; the split rule included), or reads ``dataset.json`` when the run uses
existing shards, and opens the headers of a sample of training images for their sizes.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config.schema import ConfigError, DataConfig
from trainer.data.listing import DataError
from trainer.data.meta import read_meta
from trainer.data.prepare import build_listing, source_change

SIZE_SAMPLE = 64
"""Training images whose header is read for the source size (evenly spaced over the listing)."""


@dataclass(frozen=True)
class DataSurvey:
    """The data as the planner sees it.

    Attributes:
        classes: class names in label order. class_counts: training images per class.
        num_train, num_val, num_test: images per split (``num_test`` 0 without a test split).
        source_side: median short side (pixels) of the sampled training images; None when unknown
            (existing shards: the planner then assumes the backbone's pretraining size).
        write_shards: images the run must write into shards before training (0: the shards are reused).
    """

    classes: tuple[str, ...]
    class_counts: tuple[int, ...]
    num_train: int
    num_val: int
    num_test: int
    source_side: int | None
    write_shards: int

    @property
    def imbalance(self) -> float:
        """Largest over smallest class count of the training split (1.0: balanced)."""
        return max(self.class_counts) / max(1, min(self.class_counts))

    def to_dict(self) -> dict:
        """Plain dict for ``plan.json`` (without the class names, which ``dataset.json`` holds)."""
        d = asdict(self)
        d["num_classes"] = len(d.pop("classes"))
        d["class_counts"] = list(d["class_counts"])
        return d


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


def survey_data(cfg: DataConfig) -> DataSurvey:
    """Survey the data ``cfg`` names (see the module docstring); writes nothing (a configured download runs).

    Raises:
        ConfigError: the data cannot be listed (names the field, folder, file or row).
    """
    try:
        listing = build_listing(cfg)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if listing is None:  # existing shards, used as they are
        meta = read_meta(cfg.meta or Path(cfg.shard_dir) / "dataset.json")
        sp = meta.splits
        return DataSurvey(tuple(meta.classes), tuple(sp["train"].class_counts), sp["train"].num_samples,
                          sp["val"].num_samples if "val" in sp else 0, sp["test"].num_samples if "test" in sp else 0,
                          None, 0)
    train = listing.splits.get("train", [])
    counts = listing.class_counts("train")  # multi-label: the images carrying each class
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
    return DataSurvey(tuple(listing.classes), tuple(counts),
                      len(train), len(listing.splits.get("val", [])), len(listing.splits.get("test", [])),
                      int(statistics.median(sides)) if sides else None, write)
