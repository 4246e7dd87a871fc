"""``dataset.json``: the one reader and writer of the metadata beside the shards.

Layout (``FORMAT_VERSION`` 2; version 1 files, without ``source``/``leaks``, are still read)::

    {"format_version": 2,
     "task": "multiclass" | "multilabel",
     "classes": [names in index order],
     "splits": {"train": {"num_samples": N, "num_shards": S, "class_counts": [..], "shards": [..],
                          "shard_sizes": [..], "num_skipped": K,
                          "skipped": [{"path": .., "reason": .., "where": ..}]},
                "val": {...}, "test": {...}},
     "source": {"layout": "split_folders" | "class_folders" | "manifest", "location": ..,
                "params": {..}, "files_sha256": .., "num_files": ..,
                "split": {"method": .., "sha256": {split: ..}} (class_folders only)},
     "leaks": {"cross_split": {"count": .., "examples": [..]},
               "repeated_paths": {"count": .., "examples": [..]},
               "duplicates_within_split": {"count": .., "examples": [..]}}}

``task`` (missing in older files: ``multiclass``) says what the shards hold: ``cls`` labels, or ``labels.json``
label sets (:mod:`trainer.data.shard_writer`); a multi-label split's ``class_counts`` are the images carrying each
class (at most ``num_samples`` each, any sum). Reusing shards of another task is refused
(:func:`trainer.data.prepare.source_change`, :func:`trainer.data.prepare.prepare_dataset`).

Paths that are not valid UTF-8 are stored as Python reads them (``os.fsdecode``: surrogate escapes,
``\\udcxx`` in the JSON); ``os.fsencode`` gives the original bytes back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.sources import _URL_RE
from trainer.files.atomic import atomic_write

FORMAT_VERSION = 2
"""Version written into every ``dataset.json``; files of version 1 .. FORMAT_VERSION are read."""

TASKS = ("multiclass", "multilabel")
"""Values of ``task`` (``data.task``)."""

META_NAME = "dataset.json"


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
    """Contents of ``dataset.json`` (written by :func:`trainer.data.shard_writer.write_listing`).

    Attributes:
        classes: class names in label order (index = integer label), from the training split.
        splits: split name -> :class:`SplitMeta` (``train``, ``val``, and ``test`` when the data has one).
        format_version: 1 or 2.
        root: folder of ``dataset.json``; relative shard names are relative to it.
        source: what the shards were written from (layout, parameters, fingerprint); ``{}`` for version 1.
        leaks: images shared between splits, paths listed twice, duplicates (``{}`` when none / version 1).
        task: ``multiclass`` (one ``cls`` label per sample) or ``multilabel`` (``labels.json`` label sets).
    """

    classes: list[str]
    splits: dict[str, SplitMeta]
    format_version: int
    root: str = "."
    source: dict = field(default_factory=dict)
    leaks: dict = field(default_factory=dict)
    task: str = "multiclass"

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


def meta_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/dataset.json`` when ``path`` is a folder."""
    p = Path(path)
    return p / META_NAME if p.is_dir() else p


def _need(obj: dict, key: str, typ: type | tuple, where: str, path: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: missing key '{where}{key}'")
    value = obj[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ValueError(f"{path}: key '{where}{key}' must be {getattr(typ, '__name__', typ)}, "
                         f"got {type(value).__name__}")
    return value


def load_json(path: str | os.PathLike) -> dict:
    """The raw dict of a metadata file (``dataset.json`` or a writer's partial file).

    Raises:
        FileNotFoundError: no such file. ValueError: not valid JSON (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset metadata not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"{p}: not valid JSON: {exn}") from None


def read_meta(path: str | os.PathLike) -> DatasetMeta:
    """Read and check ``dataset.json`` (a file, or a folder holding it).

    Returns:
        :class:`DatasetMeta` with ``root`` = the file's folder.

    Raises:
        FileNotFoundError: no such file. ValueError: invalid JSON or a missing/ill-typed/inconsistent
            key; the message names the file and the key (e.g. ``splits.val.class_counts``).
    """
    p = meta_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"read_meta: dataset metadata not found: {p}")
    obj = load_json(p)
    path_s = str(p)
    version = _need(obj, "format_version", int, "", path_s)
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{p}: unsupported format_version {version} (this trainer reads 1..{FORMAT_VERSION})")
    task = obj.get("task", "multiclass")
    if task not in TASKS:
        raise ValueError(f"{p}: key 'task' must be one of {list(TASKS)}, got {task!r}")
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
        if task == "multilabel":
            if len(counts) != len(classes) or not all(isinstance(c, int) and 0 <= c <= n for c in counts):
                raise ValueError(f"{p}: key '{w}class_counts' must have {len(classes)} entries in [0, num_samples="
                                 f"{n}] (multilabel), got {counts}")
        elif len(counts) != len(classes) or sum(counts) != n:
            raise ValueError(f"{p}: key '{w}class_counts' must have {len(classes)} entries summing to "
                             f"num_samples={n}, got {counts}")
        if ns != len(shards) or not all(isinstance(x, str) for x in shards):
            raise ValueError(f"{p}: key '{w}shards' must list num_shards={ns} names, got {len(shards)}")
        sizes = s.get("shard_sizes")
        if sizes is not None and (len(sizes) != ns or sum(sizes) != n):
            raise ValueError(f"{p}: key '{w}shard_sizes' must have {ns} entries summing to {n}")
        splits[name] = SplitMeta(num_samples=n, num_shards=ns, class_counts=list(counts), shards=list(shards),
                                 shard_sizes=sizes, num_skipped=int(s.get("num_skipped", 0)))
    source, leaks = obj.get("source") or {}, obj.get("leaks") or {}
    if not isinstance(source, dict) or not isinstance(leaks, dict):
        raise ValueError(f"{p}: keys 'source' and 'leaks' must be mappings")
    return DatasetMeta(classes=list(classes), splits=splits, format_version=version, root=str(p.parent),
                       source=source, leaks=leaks, task=task)


def build_meta(classes: list[str], splits: dict, *, source: dict | None = None, leaks: dict | None = None,
               task: str = "multiclass") -> dict:
    """The ``dataset.json`` dict (layout: module docstring) of this format version."""
    obj = {"format_version": FORMAT_VERSION, "task": task, "classes": list(classes), "splits": splits}
    if source is not None:
        obj["source"] = source
    if leaks is not None:
        obj["leaks"] = leaks
    return obj


def write_meta(path: str | os.PathLike, obj: dict) -> None:
    """Write a metadata dict as JSON atomically (:func:`trainer.files.atomic.atomic_write`).

    Non-UTF-8 path names (surrogate escapes) are written as ``\\udcxx`` escapes (``ensure_ascii``).
    """
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=True) + "\n")
