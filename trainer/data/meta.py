"""``dataset.json``: the metadata written beside the shards (class names, per-split counts and shards)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from trainer.data.sources import _URL_RE

# ----------------------------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class SplitMeta:
    """One split of ``dataset.json``: sample count, shard names (relative to the metadata folder)."""

    num_samples: int
    num_shards: int
    class_counts: list[int]
    shards: list[str]
    shard_sizes: list[int] | None = None
    num_skipped: int = 0


@dataclass(frozen=True)
class DatasetMeta:
    """Contents of ``dataset.json`` (written by :func:`trainer.data.shard_writer.write_shards`).

    Attributes:
        classes: class names in label order (index = integer label), from the training split.
        splits: split name -> :class:`SplitMeta`.
        format_version: 1.
        root: folder of ``dataset.json``; relative shard names are relative to it.
    """

    classes: list[str]
    splits: dict[str, SplitMeta]
    format_version: int
    root: str = "."

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_urls(self, split: str) -> list[str]:
        """Paths/URLs of the shards of ``split`` (relative names joined to :attr:`root`).

        Raises:
            KeyError: no such split (message names the split and the available ones).
        """
        if split not in self.splits:
            raise KeyError(f"dataset.json in {self.root}: no split '{split}' (have {sorted(self.splits)})")
        return [s if (_URL_RE.match(s) or s.startswith("pipe:") or os.path.isabs(s)) else os.path.join(self.root, s)
                for s in self.splits[split].shards]


def _need(obj: dict, key: str, typ: type | tuple, where: str, path: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: missing key '{where}{key}'")
    value = obj[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ValueError(f"{path}: key '{where}{key}' must be {getattr(typ, '__name__', typ)}, "
                         f"got {type(value).__name__}")
    return value


def read_meta(path: str | os.PathLike) -> DatasetMeta:
    """Read and check ``dataset.json`` (a file, or a folder holding it).

    Returns:
        :class:`DatasetMeta` with ``root`` = the file's folder.

    Raises:
        FileNotFoundError: no such file. ValueError: invalid JSON or a missing/ill-typed/inconsistent
            key; the message names the file and the key (e.g. ``splits.val.class_counts``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.json"
    if not p.is_file():
        raise FileNotFoundError(f"read_meta: dataset metadata not found: {p}")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{p}: not valid JSON: {exn}") from None
    path_s = str(p)
    version = _need(obj, "format_version", int, "", path_s)
    if version != 1:
        raise ValueError(f"{p}: unsupported format_version {version} (this trainer reads 1)")
    classes = _need(obj, "classes", list, "", path_s)
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"{p}: key 'classes' must be a non-empty list of distinct strings")
    splits = {}
    for name, s in _need(obj, "splits", dict, "", path_s).items():
        w = f"splits.{name}."
        n = _need(s, "num_samples", int, w, path_s)
        ns = _need(s, "num_shards", int, w, path_s)
        counts = _need(s, "class_counts", list, w, path_s)
        shards = _need(s, "shards", list, w, path_s)
        if len(counts) != len(classes) or sum(counts) != n:
            raise ValueError(f"{p}: key '{w}class_counts' must have {len(classes)} entries summing to "
                             f"num_samples={n}, got {counts}")
        if ns != len(shards) or not all(isinstance(x, str) for x in shards):
            raise ValueError(f"{p}: key '{w}shards' must list num_shards={ns} names, got {len(shards)}")
        sizes = s.get("shard_sizes")
        if sizes is not None and (len(sizes) != ns or sum(sizes) != n):
            raise ValueError(f"{p}: key '{w}shard_sizes' must have {ns} entries summing to {n}")
        splits[name] = SplitMeta(num_samples=n, num_shards=ns, class_counts=list(counts), shards=list(shards),
                                 shard_sizes=sizes, num_skipped=int(s.get("num_skipped", 0)))
    return DatasetMeta(classes=list(classes), splits=splits, format_version=version, root=str(p.parent))
