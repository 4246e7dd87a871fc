"""CSV / JSONL manifests -> :class:`trainer.data.listing.Listing`.

``data.manifest`` is one file with a split column, or a mapping ``{train: f1, val: f2[, test: f3]}`` (keys
may also be any split value below, e.g. ``validation``; two keys of one split are an error). Files are
UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is dropped, also in the label map.
CSV files have a header row; JSONL files hold one object (or array) per line. Columns are given by
name or by 0-based index (``data.path_column``, ``data.label_column``, ``data.split_column``); unset,
they are found by name, case-insensitively: path from ``path, filepath, file_path, filename, file,
image, image_path, img``; label from ``label, class, class_name, classname, target, category, y``;
split from ``split``. Split values: ``train``/``training``, ``val``/``valid``/``validation``/``dev``,
``test``/``testing``.

Paths are relative to the manifest's folder (absolute paths are kept). Labels are class names or
integers. The class map: with ``data.label_map`` (a JSON file ``{name: index}`` or ``[names]``) that
file's order, and a row's label may be a name or an index of it; without, the distinct labels of the
training rows, sorted (numerically when all are integers).

Bad rows are refused, all of them at once: a row without one of the columns, an empty (or whitespace)
path or label, an unknown split value, a label that is not in the class map. One line names up to
:data:`MAX_ROWS_NAMED` of them by file and line, then ``and N more (M bad rows)``. A class of the
label map without a training row is an error too. A path
listed in more than one row is recorded (``Listing.repeated``) and reported under ``data.on_leak``.
Missing or unreadable files are found while writing and reported with their line.

Multi-label (``data.task: multilabel``, :mod:`trainer.data.multilabel`): a row's labels are a set, from a label
column split on ``data.label_delimiter`` (looked for also as ``labels``, ``tags``), a JSON list, or one 0/1
column per class (``data.label_columns``); an empty set is a negative. The class map is every label of the
training rows (sorted as above) or ``data.label_map``. Under ``data.task: multiclass`` a cell holding several
labels (a JSON list, or text containing the delimiter) is a bad row naming ``data.task``. With
``data.val_fraction`` a multi-label manifest without val rows is split by iterative stratification.

The fingerprint compared on reuse is the SHA-256 of the manifest (and label map) bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from trainer.data.listing import DataError, Item, Listing, rel_list_sha
from trainer.data.multilabel import (
    LABEL_SET_NAMES,
    SPLIT_METHOD,
    label_column_getters,
    parse_label_cell,
    row_label_set,
    split_rows,
)

PATH_NAMES = ("path", "filepath", "file_path", "filename", "file", "image", "image_path", "img")
LABEL_NAMES = ("label", "class", "class_name", "classname", "target", "category", "y")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
MAX_ROWS_NAMED = 20
"""Bad rows named in one error message; the rest are counted (``and N more``)."""

ENCODING = "utf-8-sig"
"""Manifests and label maps are UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is dropped."""


def _read_rows(path: Path) -> tuple[list[str] | None, list[tuple[int, list | dict]]]:
    """(CSV header or None, [(line number, row)]); JSONL rows are dicts or lists (anything else is kept
    and reported as a bad row)."""
    if not path.is_file():
        raise DataError(f"data.manifest: file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path, encoding=ENCODING, errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as exn:
                        raise DataError(f"data.manifest: {path} line {n}: not valid JSON ({exn.msg})") from None
        return None, rows
    with open(path, newline="", encoding=ENCODING, errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"data.manifest: {path} is empty (a CSV manifest needs a header row)")
        rows = [(reader.line_num, r) for r in reader if r]
    return header, rows


def _column(spec, names: tuple[str, ...], header: list[str] | None, rows, field: str, path: Path,
            required: bool = True):
    """Resolve a column spec (name, index or None = look for ``names``) -> ``(getter row -> value, column
    name or index for messages)``, or None when not ``required`` and not found."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        i = int(spec)
        shown = header[i] if header is not None and i < len(header) else i
        return (lambda r: (list(r.values()) if isinstance(r, dict) else r)[i]), shown
    first = next((r for _, r in rows if isinstance(r, dict)), None)
    keys = header if header is not None else (list(first) if first is not None else [])
    if spec is not None:
        if spec in keys:
            found = spec
        else:
            raise DataError(f"data.{field}: column {spec!r} not in {path} (columns: {keys})")
    else:
        lower = {k.strip().lower(): k for k in keys if isinstance(k, str)}
        found = next((lower[n] for n in names if n in lower), None)
        if found is None:
            if not required:
                return None
            raise DataError(f"data.{field}: {path} has none of the columns {list(names)} (columns: {keys}); "
                            f"set data.{field} to a column name or index")
    if header is not None:
        i = header.index(found)
        return (lambda r: r[i]), found
    return (lambda r: r[found]), found


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _bad_rows_message(problems: list[tuple[str, str]], files: list[Path]) -> str:
    """One line: ``data.<field>: <row>: <problem>; ...; and N more (M bad rows) (in <files>)``; the field
    is the one all problems share, else ``manifest``."""
    fields = {f for f, _ in problems}
    field = fields.pop() if len(fields) == 1 else "manifest"
    text = "; ".join(t for _, t in problems[:MAX_ROWS_NAMED])
    if len(problems) > MAX_ROWS_NAMED:
        text += f"; and {len(problems) - MAX_ROWS_NAMED} more ({len(problems)} bad rows)"
    return f"data.{field}: {text} (in {', '.join(str(p) for p in files)})"


def load_label_map(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a JSON ``{name: index}`` (indices 0..K-1) or ``[names]``.

    Read as UTF-8; a byte-order mark is dropped.

    Raises:
        DataError: missing file, invalid JSON, an empty class name, or indices that are not 0..K-1 (names
            ``data.label_map``).
    """
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding=ENCODING))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise DataError(f"data.label_map: cannot read {p}: {exn}") from None
    names = None
    if isinstance(obj, list) and all(isinstance(n, str) for n in obj) and len(set(obj)) == len(obj) and obj:
        names = list(obj)
    elif isinstance(obj, dict) and obj and sorted(obj.values()) == list(range(len(obj))):
        names = [name for name, _ in sorted(obj.items(), key=lambda kv: kv[1])]
    if names is None or any(not n.strip() for n in names):
        raise DataError(f"data.label_map: {p} must be a JSON list of distinct, non-empty class names or a mapping "
                        "{name: index} with indices 0..K-1")
    return names


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


def _split_files(manifest: str | os.PathLike | Mapping[str, str], need_val: bool = True) -> dict[str, Path]:
    """``{"all": file}`` or ``{split: file}`` with split names as in :data:`SPLIT_VALUES` made canonical
    (``need_val`` False: a mapping may lack val, the automatic split makes it)."""
    if isinstance(manifest, (str, os.PathLike)):
        return {"all": Path(manifest)}
    files: dict[str, Path] = {}
    given: dict[str, str] = {}
    for key, value in dict(manifest).items():
        split = SPLIT_VALUES.get(str(key).strip().lower())
        if split is None:
            raise DataError(f"data.manifest: unknown split {key!r} (use train, val, test; or one of "
                            f"{sorted(SPLIT_VALUES)})")
        if split in files:
            raise DataError(f"data.manifest: both {given[split]!r} and {key!r} are given (the same split, "
                            f"{split}); keep one")
        files[split], given[split] = Path(value), str(key)
    if not ({"train", "val"} if need_val else {"train"}) <= set(files):
        raise DataError(f"data.manifest: needs at least train and val files, got {sorted(given.values())}")
    return files


def _row_problems(row, get_path, get_label, get_split, empty_label_ok: bool = False) -> tuple[list[tuple[str, str]],
                                                                                               tuple]:
    """``([(field, problem)], (rel, label, split))`` of one row (getters from :func:`_column`, ``get_split``
    None for a per-split file, ``get_label`` None for 0/1 label columns); the values are valid only without
    problems. ``empty_label_ok``: an empty label cell is no problem (a multi-label negative)."""
    none = (None, None, None)
    if not isinstance(row, (list, dict)):
        return [("manifest", f"a row is a JSON object or array, not {type(row).__name__}")], none
    values = []
    for getter in (get_path, get_label, get_split):
        if getter is None:
            values.append(None)
            continue
        try:
            values.append(getter[0](row))
        except (IndexError, KeyError):
            return [("manifest", f"row has no column {getter[1]!r}")], none
    rel, label, split = values
    none = (None, label, None)
    problems = []
    if _is_empty(rel):
        problems.append(("manifest", f"empty path (column {get_path[1]!r})"))
    if get_label is not None and _is_empty(label) and not empty_label_ok:
        problems.append(("manifest", f"empty label (column {get_label[1]!r})"))
    if get_split is not None:
        split = SPLIT_VALUES.get(str(split).strip().lower())
        if split is None:
            problems.append(("split_column", f"split {values[2]!r} is not one of {sorted(SPLIT_VALUES)}"))
    return problems, ((str(rel), label, split) if not problems else none)


def list_manifest(manifest: str | Mapping[str, str], *, path_column=None, label_column=None, split_column=None,
                  label_map: str | None = None, task: str = "multiclass", label_delimiter: str = "|",
                  label_columns=None, val_fraction: float | None = None, test_fraction: float = 0.0,
                  split_seed: int = 0) -> Listing:
    """Read one manifest with a split column, or ``{split: manifest}`` files (format: module docstring).

    Files are read as UTF-8 (a byte-order mark is dropped). Every bad row (a missing column, an empty
    path or label, an unknown split value, a label not in the class map) is collected first; then one
    error names up to :data:`MAX_ROWS_NAMED` of them, by file and line, and counts the rest.

    Args:
        task: ``multiclass`` (``Item.label``) or ``multilabel`` (``Item.labels``; forms and bad cells:
            :mod:`trainer.data.multilabel`, with ``label_delimiter`` and ``label_columns``).
        val_fraction, test_fraction, split_seed: ``multilabel`` only: split the training rows (a manifest
            without val rows) by :func:`trainer.data.multilabel.iterative_split`.

    Raises:
        DataError: one line: a missing manifest or column, bad rows (above; under ``multiclass`` also a cell
            holding several labels, naming ``data.task``), a label-map class without training rows, no
            training row (``multilabel``: no label in them), two keys for one split (``val`` and
            ``validation``), val rows with ``val_fraction``.
    """
    multilabel = task == "multilabel"
    if val_fraction is not None and not multilabel:
        raise DataError("data.val_fraction: a single-label manifest gives its own splits (split column or one file "
                        "per split)")
    files = _split_files(manifest, need_val=val_fraction is None)
    raw: dict[str, list[tuple[str, object, str, str, tuple[int, int]]]] = {"train": [], "val": [], "test": []}
    problems: list[tuple[tuple[int, int], str, str]] = []  # ((file index, line), field, "where: problem")
    labels_of_bad_rows: set[str] = set()  # not reported again as "not in the class map" (a consequence)
    h = hashlib.sha256()
    for k, (split, path) in enumerate(files.items()):
        header, rows = _read_rows(path)
        h.update(path.read_bytes())
        get_path = _column(path_column, PATH_NAMES, header, rows, "path_column", path)
        get_split = _column(split_column, ("split",), header, rows, "split_column", path,
                            required=val_fraction is None) if split == "all" else None
        get_label = get_set = None
        if multilabel and label_columns is not None:
            get_set = label_column_getters(label_columns, header, rows, path,
                                           [get_path[1]] + ([get_split[1]] if get_split else []))
        else:
            try:
                get_label = _column(label_column, LABEL_SET_NAMES + LABEL_NAMES if multilabel else LABEL_NAMES,
                                    header, rows, "label_column", path)
            except DataError as e:
                multi = None if multilabel or label_column is not None else \
                    _column(None, LABEL_SET_NAMES, header, rows, "label_column", path, required=False)
                if multi is None:
                    raise
                raise DataError(f"{e} (column {multi[1]!r} looks multi-label: set data.task: multilabel)") from None
        base = path.parent
        for n, row in rows:
            where = f"{path.name} line {n}"
            found, (rel, label, s) = _row_problems(row, get_path, get_label, get_split, empty_label_ok=multilabel)
            if not found:
                found, label = row_label_set(row, label, multilabel, get_set, label_delimiter)
            if found:
                field = found[0][0] if len({f for f, _ in found}) == 1 else "manifest"
                problems.append(((k, n), field, f"{where}: {', '.join(t for _, t in found)}"))
                if multilabel:
                    labels_of_bad_rows.update(parse_label_cell(label, label_delimiter)[0] if get_label else ())
                elif not _is_empty(label):
                    labels_of_bad_rows.add(str(label).strip())
                continue
            raw[s if get_split else ("train" if split == "all" else split)].append((rel, label, where,
                                                                                    str(base / rel), (k, n)))
    names = load_label_map(label_map) if label_map else None
    if label_map:
        h.update(Path(label_map).read_bytes())
    if not raw["train"] and not problems:
        raise DataError(f"data.manifest: no training row in {[str(p) for p in files.values()]}")
    if val_fraction is not None:
        split_rows(raw, val_fraction, test_fraction, split_seed)
    classes = _class_map([v for row in raw["train"] for v in (row[1] if multilabel else (row[1],))], names)
    if not classes and not problems:
        raise DataError(f"data.manifest: no label in the training rows of {[str(p) for p in files.values()]} (every "
                        "row is a negative); a multi-label set needs at least one labelled training row")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Item]] = {}
    seen: dict[str, list[str]] = {}
    for split, rows in raw.items():
        if not rows and split == "test":
            continue
        items = []
        for rel, label, where, file, pos in rows:
            ys, unknown = [], []
            for value in (label if multilabel else (label,)):
                key = str(value).strip()
                if key in index:
                    ys.append(index[key])
                elif names is not None and _as_int(value) is not None and 0 <= _as_int(value) < len(classes):
                    ys.append(_as_int(value))
                else:
                    unknown.append(value)
            if unknown:
                new = [v for v in unknown if str(v).strip() not in labels_of_bad_rows]
                if new:  # else: its training rows are bad rows, named already
                    src = f"data.label_map {label_map}" if names is not None else "the training rows"
                    problems.append((pos, "label_column", f"{where}: label {new[0]!r} is not in the class map "
                                     f"({len(classes)} classes from {src}) for {rel!r}"))
                continue
            items.append(Item(file, rel, -1, where, tuple(sorted(set(ys)))) if multilabel else
                         Item(file, rel, ys[0], where))
            seen.setdefault(os.path.normpath(file), []).append(f"{where} ({split})")
        splits[split] = items
    if problems:
        problems.sort(key=lambda p: p[0])
        raise DataError(_bad_rows_message([(f, t) for _, f, t in problems], list(files.values())))
    counts = [0] * len(classes)
    for it in splits["train"]:
        for y in (it.labels if multilabel else (it.label,)):
            counts[y] += 1
    if 0 in counts:
        raise DataError(f"data.label_map: class {classes[counts.index(0)]!r} has no training row "
                        f"({counts.count(0)} such class(es)); an empty class could never be learned")
    repeated = [(p, w) for p, w in seen.items() if len(w) > 1]
    params = {"path_column": path_column, "label_column": label_column, "split_column": split_column,
              "label_map": label_map}
    if multilabel:  # multiclass records exactly what it did before, so its shards are reused as they are
        params.update(task=task, label_delimiter=label_delimiter, label_columns=label_columns)
        if val_fraction is not None:
            params.update(val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    source = {"layout": "manifest", "location": {k: str(v) for k, v in files.items()}, "params": params,
              "files_sha256": h.hexdigest(), "num_files": sum(len(v) for v in splits.values())}
    if val_fraction is not None:
        source["split"] = {"method": SPLIT_METHOD, "sha256": {s: rel_list_sha(v) for s, v in splits.items()}}
    return Listing(classes=classes, splits=splits, source=source, key_prefix=True, repeated=repeated, task=task)

