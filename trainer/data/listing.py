"""What a dataset is made of, before any image is read: per split, the files and their labels.

Three layouts become the same :class:`Listing` (class map + ``split -> [Item]`` + a fingerprint):

* ``split_folders``: ``root/{train,val[,test]}/<class>/<image>``, val also named ``validation`` or ``valid``
  (:func:`list_split_folders`);
* ``class_folders``: ``root/<class>/<image>`` split by :func:`stratified_split` (:func:`list_class_folders`);
* ``manifest``: CSV / JSONL rows (``trainer.data.manifest``).

Rules shared by the folder layouts: hidden names (starting with '.') are ignored; files inside
sub-folders of a class folder belong to that class; the class map is the sorted training class
folder names. A training class folder with no file is an error naming it (a class the head could
never learn); an empty validation or test class folder is fine (count 0).

File names are whatever the file system holds: Python's ``os.fsdecode`` strings (surrogate escapes for
bytes that are not UTF-8), so ``os.fsencode(item.rel)`` is always the original name.
:func:`printable` turns them into one-line text for keys, logs and reports; :func:`escape_name` into
one-line text that :func:`unescape_name` turns back into the exact bytes (CSV columns).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
VAL_FOLDER_NAMES = ("val", "validation", "valid")
"""Names of the validation split folder, in order of preference (Hugging Face and many published datasets
use ``validation`` or ``valid``); a root with two of them is an error."""

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data on disk does not fit (empty class folder, unknown label, changed source...); the message
    names the config field, file, row or folder."""


@dataclass(frozen=True)
class Item:
    """One image of a split.

    Attributes:
        file: full path to read (``os.fsdecode`` string).
        rel: the name stored in the shard (``<key>.path.txt``): relative to the data root or manifest folder.
        label: class index (``-1`` for a multi-label item).
        where: where the item was listed, for messages (``"train.csv line 12"``), or ``""`` for folders.
        labels: a multi-label item's label set: sorted, distinct class indices (``()``: a negative, or a
            multiclass item).
    """

    file: str
    rel: str
    label: int
    where: str = ""
    labels: tuple[int, ...] = ()


@dataclass
class Listing:
    """A dataset before sharding.

    Attributes:
        classes: names in label order.
        splits: split name -> items in a fixed (sorted or manifest) order.
        source: recorded in ``dataset.json`` (layout, params, fingerprint); compared on reuse.
        key_prefix: prepend ``<split>/`` to keys (layouts whose ``rel`` does not start with the split).
        repeated: ``(rel, [where, ...])`` of paths listed more than once (manifests).
        task: ``multiclass`` (``Item.label``) or ``multilabel`` (``Item.labels``; manifests only).
    """

    classes: list[str]
    splits: dict[str, list[Item]]
    source: dict
    key_prefix: bool = False
    repeated: list[tuple[str, list[str]]] = field(default_factory=list)
    task: str = "multiclass"

    def class_counts(self, split: str = "train") -> list[int]:
        """Images of ``split`` per class in label order (multi-label: the images carrying each class); zeros
        for a split the listing does not have."""
        counts = [0] * len(self.classes)
        for it in self.splits.get(split, []):
            for y in (it.labels if self.task == "multilabel" else (it.label,)):
                counts[y] += 1
        return counts


def printable(name: str) -> str:
    """One-line, valid UTF-8 text for a file name: undecodable bytes as ``\\xNN``, control characters
    (newline, tab...) as ``\\n``, ``\\t``, ``\\xNN``. Not reversible; keys, logs and reports use it."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def escape_name(name: str) -> str:
    """Reversible one-line, valid UTF-8 text for a file name (an ``os.fsdecode`` string): a backslash is
    written ``\\\\``, each byte that is not valid UTF-8 and each UTF-8 byte of a non-printable
    character (newline, tab, other control characters) ``\\xNN`` (two lowercase hex digits); everything
    else as it is. :func:`unescape_name` returns the original bytes. Names without backslashes or
    such bytes are unchanged."""
    if name.isprintable() and "\\" not in name:
        return name
    out = []
    for c in name:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # surrogate escape of an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif not c.isprintable():
            out.append("".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogatepass")))
        else:
            out.append(c)
    return "".join(out)


_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def unescape_name(text: str) -> bytes:
    """The bytes of a file name written by :func:`escape_name` (``os.fsdecode`` them to open the file)."""
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8", "surrogateescape")
        out += b"\\" if m.group(1) == "\\" else bytes([int(m.group(1)[1:], 16)])
        pos = m.end()
    out += text[pos:].encode("utf-8", "surrogateescape")
    return bytes(out)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def files_under(folder: str | os.PathLike) -> list[str]:
    """Sorted non-hidden files below ``folder`` (recursive, hidden folders skipped), as paths relative to
    ``folder`` (``os.fsdecode`` strings)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = os.path.relpath(dirpath, folder)
        for fn in filenames:
            if not _is_hidden(fn):
                out.append(fn if rel_dir == "." else os.path.join(rel_dir, fn))
    return sorted(out)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name)) if folder.is_dir() else []


def rel_list_sha(items: Sequence[Item]) -> str:
    """SHA-256 hex digest of a split's names and labels, in order (recorded for a split that was drawn)."""
    h = hashlib.sha256()
    for it in items:
        labels = f"\0{','.join(map(str, it.labels))}" if it.labels else ""
        h.update(os.fsencode(it.rel) + f"\0{it.label}{labels}\n".encode())
    return h.hexdigest()


def _require_training_files(classes: list[str], per_class: dict[str, list], folder_of) -> None:
    empty = [folder_of(c) for c in classes if not per_class[c]]
    if empty:
        raise DataError(f"data.root: training class folder {printable(str(empty[0]))} holds no image"
                        + (f" (and {len(empty) - 1} more empty class folder(s))" if len(empty) > 1 else "")
                        + "; remove it or add images (an empty class could never be learned)")


def split_folder(root: str | os.PathLike, split: str) -> Path | None:
    """The folder of ``split`` under ``root``: ``root/<split>``, for ``val`` the one of
    :data:`VAL_FOLDER_NAMES` that exists; None when there is none.

    Raises:
        DataError: two validation folders (e.g. ``val/`` and ``validation/``), both named.
    """
    root = Path(root)
    names = VAL_FOLDER_NAMES if split == "val" else (split,)
    found = [n for n in names if (root / n).is_dir()]
    if len(found) > 1:
        raise DataError(f"data.root: {root} has two validation folders, {found[0]}/ and {found[1]}/; keep one "
                        "(rename or move the other)")
    return root / found[0] if found else None


def list_split_folders(root: str | os.PathLike, splits: Sequence[str] | None = None) -> Listing:
    """``root/{train,val[,test]}/<class>/<image>`` -> :class:`Listing` (``rel`` = path relative to root).

    The validation folder may be named ``val``, ``validation`` or ``valid`` (:func:`split_folder`); its
    split is ``val`` whatever its name, ``rel`` keeps the real folder name.

    Args:
        splits: splits to list (default: ``train``, ``val`` and ``test`` if present); ``validation`` and
            ``valid`` mean ``val``.

    Raises:
        DataError: no ``train`` folder or no class in it, no validation folder or two of them, an empty
            training class folder, a class folder in another split that training does not have, a
            requested split folder missing.
    """
    root = Path(root)
    if not (root / "train").is_dir():
        raise DataError(f"data.root: {root} has no train/ folder (expected root/train/<class>/<image>)")
    if splits is not None:  # "validation" / "valid" name the val split too
        splits = list(dict.fromkeys("val" if s in VAL_FOLDER_NAMES else s for s in splits))
    folders = {s: split_folder(root, s) for s in (splits if splits is not None else SPLITS)}
    if splits is None and folders["val"] is None:
        raise DataError(f"data.root: {root} has train/ but no val/ (or validation/, valid/) folder "
                        "(expected root/{train,val}/<class>/<image>)")
    wanted = list(splits) if splits is not None else [s for s in SPLITS if folders[s] is not None]
    classes = [p.name for p in _class_folders(root / "train")]
    if not classes:
        raise DataError(f"data.root: {root / 'train'} holds no class folder")
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[Item]] = {}
    all_files: list[str] = []
    for split in wanted:
        split_dir = folders[split]
        if split_dir is None:
            raise DataError(f"data.root: split folder {root / split} not found (splits: {wanted})")
        per_class: dict[str, list[str]] = {c: [] for c in classes}
        for entry in sorted(split_dir.iterdir()):
            if _is_hidden(entry.name) or not entry.is_dir():
                continue  # loose files beside the class folders are not samples
            if entry.name not in index:
                raise DataError(f"data.root: class folder {printable(str(entry))} of split '{split}' is not a "
                                f"class of the training split {root / 'train'} (classes: {classes})")
            per_class[entry.name] = files_under(entry)
        if split == "train":
            _require_training_files(classes, per_class, lambda c: split_dir / c)
        items = [Item(str(split_dir / c / f), f"{split_dir.name}/{c}/{f}", index[c])
                 for c in classes for f in per_class[c]]
        items.sort(key=lambda it: os.fsencode(it.rel))
        out[split] = items
        all_files += [it.file for it in items]
    source = {"layout": "split_folders", "location": str(root), "params": {"splits": wanted},
              "files_sha256": _tree_fingerprint(root, all_files), "num_files": len(all_files)}
    return Listing(classes=classes, splits=out, source=source)


def _tree_fingerprint(root: Path, files: Sequence[str]) -> str:
    """SHA-256 over the sorted paths (relative to ``root``), sizes and modification times (ns) of
    ``files``: one ``stat`` per file; an added, removed, renamed or rewritten file changes it."""
    h = hashlib.sha256()
    for f in sorted(files, key=os.fsencode):
        st = os.stat(f)
        h.update(os.fsencode(os.path.relpath(f, root)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _share(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5) if fraction > 0 else 0  # round half up (round() rounds 0.5 to 0)


def split_sizes(n: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int, int]:
    """``(train, val, test)`` image counts of one class of ``n`` images under :func:`stratified_split`.

    Rule (``share(f) = floor(f * n + 0.5)``, round half up): val gets ``share(val_fraction)``, test
    ``share(test_fraction)``, then

    * a class of at least 2 images gets at least 1 val image; with ``test_fraction > 0`` a class of at
      least 3 images gets at least 1 test image (smaller ones get none: :func:`stratified_split` names them);
    * at least 1 image stays in train (when ``val_fraction + test_fraction < 1``): while val + test is
      more than ``n - 1``, the one further above its exact share ``f * n`` gives one back (test on a tie),
      never below its minimum above.

    So val is at most ``max(1, share(val_fraction)) <= val_fraction * n + 1`` (the same for test), and
    never 0 for ``n >= 2``. ``val_fraction + test_fraction >= 1`` (evaluation: "every image is val")
    puts everything in val and test.
    """
    n_test, n_val = min(_share(test_fraction, n), n), min(_share(val_fraction, n), n)
    if val_fraction + test_fraction >= 1:
        return 0, n - n_test, n_test
    min_val = 1 if n >= 2 else 0
    min_test = 1 if test_fraction > 0 and n >= 3 else 0
    n_val, n_test = max(n_val, min_val), max(n_test, min_test)
    while n_val + n_test > n - 1:  # ends: min_val + min_test <= n - 1 for every n >= 1
        val_over, test_over = n_val - val_fraction * n, n_test - test_fraction * n
        if n_test > min_test and (test_over >= val_over or n_val <= min_val):
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _names(classes: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(printable(c)) for c in classes[:limit])
    return shown + (f" and {len(classes) - limit} more" if len(classes) > limit else "")


def stratified_split(files_by_class: dict[str, list[str]], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, dict[str, list[str]]]:
    """Per class: shuffle the sorted files with ``Random(f"split/{seed}/{class}")``, then the first
    ``test`` of :func:`split_sizes` go to test, the next ``val`` to val, the rest to train (each split's
    list sorted again). Depends only on the sorted names, the fractions and the seed.

    Logs one warning naming the classes too small for a val image (1 image) and, with ``test_fraction > 0``,
    one naming those too small for a test image (fewer than 3); no class loses its val image otherwise.

    Returns:
        ``{"train": {class: files}, "val": {...}, "test": {...}}`` (``test`` only when ``test_fraction > 0``).
    """
    out: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    if test_fraction > 0:
        out["test"] = {}
    no_val, no_test = [], []
    for cls, files in files_by_class.items():
        order = sorted(files, key=os.fsencode)
        random.Random(f"split/{seed}/{cls}").shuffle(order)
        _, n_val, n_test = split_sizes(len(order), val_fraction, test_fraction)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split in out:
            out[split][cls] = sorted(parts[split], key=os.fsencode)
        if order and n_val == 0 and val_fraction > 0:
            no_val.append(cls)
        if order and n_test == 0 and test_fraction > 0:
            no_test.append(cls)
    if no_val:
        log.warning("data.val_fraction: %d class(es) with a single image get no validation image (it stays in "
                    "train; their val accuracy is not measured): %s", len(no_val), _names(no_val))
    if no_test:
        log.warning("data.test_fraction: %d class(es) with fewer than 3 images get no test image (train and val "
                    "come first): %s", len(no_test), _names(no_test))
    return out


def list_class_folders(root: str | os.PathLike, *, val_fraction: float, test_fraction: float = 0.0,
                       seed: int = 0) -> Listing:
    """``root/<class>/<image>`` split by :func:`stratified_split` -> :class:`Listing` (``rel`` =
    ``<class>/<file>``); the split's parameters and per-split file hashes go into ``source``.

    Raises:
        DataError: no class folder, or an empty class folder (named).
    """
    root = Path(root)
    folders = _class_folders(root)
    if not folders:
        raise DataError(f"data.root: {root} holds no class folder (expected root/<class>/<image>, or "
                        "root/{train,val}/<class>/<image>)")
    classes = [p.name for p in folders]
    per_class = {c: files_under(root / c) for c in classes}
    _require_training_files(classes, per_class, lambda c: root / c)
    parts = stratified_split(per_class, val_fraction, test_fraction, seed)
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: sorted((Item(str(root / c / f), f"{c}/{f}", index[c]) for c in classes for f in by_cls[c]),
                        key=lambda it: os.fsencode(it.rel)) for s, by_cls in parts.items()}
    all_files = [str(root / c / f) for c in classes for f in per_class[c]]
    source = {"layout": "class_folders", "location": str(root),
              "params": {"val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": seed},
              "files_sha256": _tree_fingerprint(root, all_files), "num_files": len(all_files),
              "split": {"method": "stratified per class, Random(f'split/{seed}/{class}') over sorted names, "
                                  "sizes of split_sizes (>= 1 val image from 2 images)",
                        "sha256": {s: rel_list_sha(items) for s, items in splits.items()}}}
    return Listing(classes=classes, splits=splits, source=source, key_prefix=True)
