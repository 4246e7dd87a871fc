"""CSV / JSONL manifests -> :class:`trainer.data.listing.Listing`.

``data.manifest`` is one file with a split column, or a mapping ``{train: f1, val: f2[, test: f3]}``.
CSV files have a header row; JSONL files hold one object (or array) per line. Columns are given by
name or by 0-based index (``data.path_column``, ``data.label_column``, ``data.split_column``); unset,
they are found by name, case-insensitively: path from ``path, filepath, file_path, filename, file,
image, image_path, img``; label from ``label, class, class_name, classname, target, category, y``;
split from ``split``. Split values: ``train``/``training``, ``val``/``valid``/``validation``/``dev``,
``test``/``testing``.

Paths are relative to the manifest's folder (absolute paths are kept). Labels are class names or
integers. The class map: with ``data.label_map`` (a JSON file ``{name: index}`` or ``[names]``) that
file's order, and a row's label may be a name or an index of it; without, the distinct labels of the
training rows, sorted (numerically when all are integers). A label that is not in the class map is
an error naming the file and line; so is a class of the label map without a training row. A path
listed in more than one row is recorded (``Listing.repeated``) and reported under ``data.on_leak``.
Missing or unreadable files are found while writing and reported with their line.

The fingerprint compared on reuse is the SHA-256 of the manifest (and label map) bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from trainer.data.listing import DataError, Item, Listing

PATH_NAMES = ("path", "filepath", "file_path", "filename", "file", "image", "image_path", "img")
LABEL_NAMES = ("label", "class", "class_name", "classname", "target", "category", "y")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}


def _read_rows(path: Path) -> tuple[list[str] | None, list[tuple[int, list | dict]]]:
    """(CSV header or None, [(line number, row)]); JSONL rows are dicts or lists."""
    if not path.is_file():
        raise DataError(f"data.manifest: file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as exn:
                        raise DataError(f"data.manifest: {path} line {n}: not valid JSON ({exn.msg})") from None
        return None, rows
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"data.manifest: {path} is empty (a CSV manifest needs a header row)")
        rows = [(reader.line_num, r) for r in reader if r]
    return header, rows


def _column(spec, names: tuple[str, ...], header: list[str] | None, rows, field: str, path: Path,
            required: bool = True):
    """Resolve a column spec (name, index or None = look for ``names``) -> a getter ``row -> value``."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        i = int(spec)
        return lambda r: (list(r.values()) if isinstance(r, dict) else r)[i]
    keys = header if header is not None else (list(rows[0][1]) if rows and isinstance(rows[0][1], dict) else [])
    if spec is not None:
        if spec in keys:
            found = spec
        else:
            raise DataError(f"data.{field}: column {spec!r} not in {path} (columns: {keys})")
    else:
        lower = {k.lower(): k for k in keys if isinstance(k, str)}
        found = next((lower[n] for n in names if n in lower), None)
        if found is None:
            if not required:
                return None
            raise DataError(f"data.{field}: {path} has none of the columns {list(names)} (columns: {keys}); "
                            f"set data.{field} to a column name or index")
    if header is not None:
        i = header.index(found)
        return lambda r: r[i]
    return lambda r: r[found]


def load_label_map(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a JSON ``{name: index}`` (indices 0..K-1) or ``[names]``.

    Raises:
        DataError: missing file, invalid JSON, or indices that are not 0..K-1 (names ``data.label_map``).
    """
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise DataError(f"data.label_map: cannot read {p}: {exn}") from None
    if isinstance(obj, list) and all(isinstance(n, str) for n in obj) and len(set(obj)) == len(obj) and obj:
        return list(obj)
    if isinstance(obj, dict) and obj and sorted(obj.values()) == list(range(len(obj))):
        return [name for name, _ in sorted(obj.items(), key=lambda kv: kv[1])]
    raise DataError(f"data.label_map: {p} must be a JSON list of distinct class names or a mapping "
                    "{name: index} with indices 0..K-1")


def has_split_column(manifest: str | os.PathLike, split_column=None) -> bool:
    """Whether one manifest file has a split column (``split_column`` given, or a column named ``split``).

    Raises:
        DataError: missing or unreadable manifest (named).
    """
    if split_column is not None:
        return True
    path = Path(manifest)
    header, rows = _read_rows(path)
    return _column(None, ("split",), header, rows, "split_column", path, required=False) is not None


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _class_map(train_labels: list, label_map: list[str] | None) -> list[str]:
    if label_map is not None:
        return label_map
    values = {str(v).strip() for v in train_labels}
    if values and all(_as_int(v) is not None for v in values):
        return [str(v) for v in sorted({int(v) for v in values})]
    return sorted(values)


def list_manifest(manifest: str | Mapping[str, str], *, path_column=None, label_column=None, split_column=None,
                  label_map: str | None = None) -> Listing:
    """Read one manifest with a split column, or ``{split: manifest}`` files (format: module docstring).

    Raises:
        DataError: a missing manifest or column, an unknown split value, a label not in the class map
            (file and line named), a label-map class without training rows, no training row.
    """
    files = {"all": Path(manifest)} if isinstance(manifest, (str, os.PathLike)) else \
        {str(k): Path(v) for k, v in dict(manifest).items()}
    unknown = sorted(set(files) - {"all", "train", "val", "test"})
    if unknown:
        raise DataError(f"data.manifest: unknown split {unknown[0]!r} (use train, val, test)")
    if "all" not in files and not {"train", "val"} <= set(files):
        raise DataError(f"data.manifest: needs at least train and val files, got {sorted(files)}")
    raw: dict[str, list[tuple[str, object, str]]] = {"train": [], "val": [], "test": []}
    h = hashlib.sha256()
    for split, path in files.items():
        header, rows = _read_rows(path)
        h.update(path.read_bytes())
        get_path = _column(path_column, PATH_NAMES, header, rows, "path_column", path)
        get_label = _column(label_column, LABEL_NAMES, header, rows, "label_column", path)
        get_split = _column(split_column, ("split",), header, rows, "split_column", path) if split == "all" else None
        base = path.parent
        for n, row in rows:
            where = f"{path.name} line {n}"
            try:
                rel, label = str(get_path(row)), get_label(row)
                s = SPLIT_VALUES.get(str(get_split(row)).strip().lower()) if get_split else split
            except (IndexError, KeyError):
                raise DataError(f"data.manifest: {path} line {n}: row has no such column ({row!r})") from None
            if s is None:
                raise DataError(f"data.split_column: {path} line {n}: split {get_split(row)!r} is not one of "
                                f"{sorted(SPLIT_VALUES)}")
            raw[s].append((rel, label, where, str(base / rel)))
    names = load_label_map(label_map) if label_map else None
    if label_map:
        h.update(Path(label_map).read_bytes())
    if not raw["train"]:
        raise DataError(f"data.manifest: no training row in {[str(p) for p in files.values()]}")
    classes = _class_map([lab for _, lab, _, _ in raw["train"]], names)
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Item]] = {}
    seen: dict[str, list[str]] = {}
    for split, rows in raw.items():
        if not rows and split == "test":
            continue
        items = []
        for rel, label, where, file in rows:
            key = str(label).strip()
            if key in index:
                y = index[key]
            elif names is not None and _as_int(label) is not None and 0 <= _as_int(label) < len(classes):
                y = _as_int(label)
            else:
                src = f"data.label_map {label_map}" if names is not None else "the training rows"
                raise DataError(f"data.label_column: {where}: label {label!r} is not in the class map "
                                f"({len(classes)} classes from {src}) for {rel!r}")
            items.append(Item(file, rel, y, where))
            seen.setdefault(os.path.normpath(file), []).append(f"{where} ({split})")
        splits[split] = items
    counts = [0] * len(classes)
    for it in splits["train"]:
        counts[it.label] += 1
    if 0 in counts:
        raise DataError(f"data.label_map: class {classes[counts.index(0)]!r} has no training row "
                        f"({counts.count(0)} such class(es)); an empty class could never be learned")
    repeated = [(p, w) for p, w in seen.items() if len(w) > 1]
    source = {"layout": "manifest", "location": {k: str(v) for k, v in files.items()},
              "params": {"path_column": path_column, "label_column": label_column, "split_column": split_column,
                         "label_map": label_map},
              "files_sha256": h.hexdigest(), "num_files": sum(len(v) for v in splits.values())}
    return Listing(classes=classes, splits=splits, source=source, key_prefix=True, repeated=repeated)
