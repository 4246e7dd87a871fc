"""Multi-label manifests (``data.task: multilabel``): label cells -> label sets, 0/1 columns, the automatic split.

A row's label set comes from one of three forms (:func:`trainer.data.manifest.list_manifest` picks by config):

* a label column whose text is split on ``data.label_delimiter`` (default ``|``): ``river|forest``; each
  label is stripped of surrounding spaces; an empty cell (or only spaces) is the empty set, a negative;
  a label that is empty between two delimiters (``a||b``, ``a|``) is a bad row;
* in JSONL, a JSON list in the label column: ``["river", "forest"]`` (names or integers; ``[]`` is a
  negative); a single string is split as above, a single integer is one label;
* ``data.label_columns``: one 0/1 column per class, the class name is the column name; a cell holds
  ``0`` or ``1`` (also ``0.0``/``1.0`` and JSON ``true``/``false``); anything else, an empty cell
  included, is a bad row naming the column. All zeros is a negative.

A label listed twice in one row counts once. Label sets are kept as sorted, distinct class indices.

Automatic split (:func:`iterative_split`, ``data.val_fraction`` on a multi-label manifest without val
rows): iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011, "On the stratification of
multi-label data", Algorithm 1) over the rows in a fixed order: sorted by path, then shuffled with
``Random(f"split/{seed}")``. Desired counts: ``fraction x rows`` per split and ``fraction x rows with
label l`` per split and label. Repeatedly the label with the fewest rows not yet placed is taken (ties:
the smaller label name) and each of its unplaced rows goes to the split that most wants that label
(ties: the split that wants most rows overall, then the same ``Random``); rows without a label then go,
in order, to the split that wants most rows. Last, every label none of whose rows landed in train gets
its first such row (in the shuffled order) moved to train, so each label of the data is in train.
Depends only on the paths, the label sets, the fractions and the seed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from trainer.data.listing import DataError

LABEL_SET_NAMES = ("labels", "tags")
"""Column names looked for (case-insensitively) before the single-label names when ``data.label_column``
is unset and ``data.task`` is ``multilabel``."""

SPLIT_METHOD = ("iterative stratification (Sechidis et al. 2011) over the rows sorted by path and shuffled with "
                "Random(f'split/{seed}'); every label with a row keeps one in train")
"""Recorded in ``dataset.json`` (``source.split.method``) for an automatic multi-label split."""

_ONE = {"1", "1.0", "true"}
_ZERO = {"0", "0.0", "false"}


def looks_multilabel(value, delimiter: str) -> bool:
    """Whether a label cell read under ``data.task: multiclass`` holds several labels: a JSON list, or text
    containing ``delimiter``."""
    return isinstance(value, list) or (isinstance(value, str) and delimiter in value)


def _one_label(value) -> str | None:
    """A label element as text (names stripped, integers as digits), or None if it is no valid label."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def parse_label_cell(value, delimiter: str) -> tuple[tuple[str, ...], str | None]:
    """One label cell -> ``(labels, problem)``: the distinct labels as text in the cell's order (empty: a
    negative) and None, or ``((), reason)`` for a bad cell (a label empty between two delimiters, a list
    element that is not a name or integer, a cell that is neither text, integer, list nor empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return (), None
    if isinstance(value, list):
        labels = [_one_label(v) for v in value]
        if any(v is None for v in labels):
            bad = next(v for v, t in zip(value, labels) if t is None)
            return (), f"label list {value!r} holds {bad!r} (want class names or integers)"
        return tuple(dict.fromkeys(labels)), None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return (), f"label {value!r} is not a class name, an integer or a list of them"
    parts = [p.strip() for p in str(value).split(delimiter)]
    if any(not p for p in parts):
        return (), f"label {value!r} has an empty label between two delimiters (data.label_delimiter {delimiter!r})"
    return tuple(dict.fromkeys(parts)), None


def binary_value(value) -> bool | None:
    """A 0/1 cell -> False/True, or None when it is anything else (an empty cell included)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return {0: False, 1: True}.get(value) if value in (0, 1) else None
    if isinstance(value, str):
        text = value.strip().lower()
        return True if text in _ONE else (False if text in _ZERO else None)
    return None


def label_column_getters(spec, header: list[str] | None, rows: Sequence, path: Path,
                         exclude: Sequence) -> list[tuple[Callable, str]]:
    """``data.label_columns`` -> ``[(getter row -> cell, class name)]`` in the given (or file) order.

    Args:
        spec: a list of column names or 0-based indices, or ``"rest"`` (every column except ``exclude``).
        header: the CSV header, or None for JSONL (names: the keys of the first object row; array rows
            have no names, their columns are named by index).
        rows: ``[(line, row)]`` as read.
        exclude: the path and split columns (names or indices), left out of ``rest``.

    Raises:
        DataError: a named column that is not in the file, an index past the last column, ``rest`` leaving no
            column (names ``data.label_columns`` and the file).
    """
    first = next((r for _, r in rows if isinstance(r, (dict, list))), None)
    if header is not None:
        names = list(header)
    elif isinstance(first, dict):
        names = list(first)
    else:
        names = [str(i) for i in range(len(first) if first is not None else 0)]
    by_name = header is not None or isinstance(first, dict)
    if spec == "rest":
        skip = {str(e) for e in exclude}
        wanted = [i for i, n in enumerate(names) if n not in skip and str(i) not in skip]
        if not wanted:
            raise DataError(f"data.label_columns: 'rest' leaves no column in {path} (columns: {names})")
    else:
        wanted = []
        for c in spec:
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
                i = int(c)
                if i >= len(names):
                    raise DataError(f"data.label_columns: column index {i} is past the last column of {path} "
                                    f"(columns: {names})")
            elif by_name and c in names:
                i = names.index(c)
            else:
                raise DataError(f"data.label_columns: column {c!r} not in {path} (columns: {names})")
            wanted.append(i)
    out = []
    for i in wanted:
        if header is not None or not isinstance(first, dict):
            out.append(((lambda r, i=i: r[i] if isinstance(r, list) else list(r.values())[i]), names[i]))
        else:
            out.append(((lambda r, k=names[i]: r[k] if isinstance(r, dict) else r[names.index(k)]), names[i]))
    return out


def row_from_columns(row, getters: list[tuple[Callable, str]]) -> tuple[tuple[str, ...], str | None]:
    """One row's label set from its 0/1 columns -> ``(class names with a 1, problem)``; the problem names the
    first column that is missing or holds something else than 0/1."""
    labels = []
    for get, name in getters:
        try:
            value = get(row)
        except (IndexError, KeyError):
            return (), f"row has no column {name!r}"
        flag = binary_value(value)
        if flag is None:
            return (), f"column {name!r} holds {value!r} (want 0 or 1)"
        if flag:
            labels.append(name)
    return tuple(labels), None


def _pick(wants: list[list[float]], rng: random.Random) -> int:
    """Index of the largest key vector in ``wants`` (lexicographic), ties drawn with ``rng``."""
    best = max(wants)
    ties = [j for j, w in enumerate(wants) if w == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def iterative_split(label_sets: Sequence[Sequence[str]], names: Sequence[str], fractions: dict[str, float],
                    seed: int) -> list[str]:
    """The split of each row under iterative stratification (rule: module docstring).

    Args:
        label_sets: each row's labels (any hashable, sortable label; empty: a negative).
        names: each row's path (the fixed order; bytes of ``os.fsencode``), same length.
        fractions: ``{split: fraction}`` summing to 1 (splits with fraction 0 get no row).

    Returns:
        the split name of each row, in the input order.
    """
    n = len(label_sets)
    splits = [s for s, f in fractions.items() if f > 0]
    frac = [fractions[s] for s in splits]
    rng = random.Random(f"split/{seed}")
    order = sorted(range(n), key=lambda i: (os.fsencode(names[i]), i))
    rng.shuffle(order)
    want = [f * n for f in frac]
    rows_of: dict[str, list[int]] = {}
    for i in order:
        for label in label_sets[i]:
            rows_of.setdefault(label, []).append(i)
    want_label = {label: [f * len(rows) for f in frac] for label, rows in rows_of.items()}
    left = {label: len(rows) for label, rows in rows_of.items()}
    placed: list[int | None] = [None] * n
    while True:
        live = [label for label, k in left.items() if k > 0]
        if not live:
            break
        label = min(live, key=lambda lb: (left[lb], str(lb)))
        for i in rows_of[label]:
            if placed[i] is not None:
                continue
            j = _pick([[want_label[label][k], want[k]] for k in range(len(splits))], rng)
            placed[i] = j
            want[j] -= 1
            for other in label_sets[i]:
                want_label[other][j] -= 1
                left[other] -= 1
    for i in order:
        if placed[i] is None:
            j = _pick([[w] for w in want], rng)
            placed[i] = j
            want[j] -= 1
    train = splits.index("train") if "train" in splits else None
    if train is not None:
        for label in sorted(rows_of, key=str):
            rows = rows_of[label]
            if all(placed[i] != train for i in rows):
                placed[rows[0]] = train
    return [splits[j] for j in placed]


def dumps_labels(labels: Sequence[int]) -> bytes:
    """A label set as a shard member (``<key>.labels.json``): the JSON list of class indices, ASCII."""
    return json.dumps(sorted(int(i) for i in labels)).encode()


def loads_labels(raw, num_classes: int | None) -> tuple[int, ...]:
    """A ``labels.json`` member -> sorted distinct class indices.

    Raises:
        ValueError: not a JSON list of integers, or an index outside ``[0, num_classes)`` (the reason).
    """
    try:
        obj = json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"'labels.json' is not JSON: {raw[:40]!r}") from None
    if not isinstance(obj, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in obj):
        raise ValueError(f"'labels.json' is not a list of integers: {str(obj)[:40]}")
    bad = [v for v in obj if v < 0 or (num_classes is not None and v >= num_classes)]
    if bad:
        raise ValueError(f"label {bad[0]} outside [0, {num_classes})")
    return tuple(sorted(set(obj)))


def row_label_set(row, label, multilabel: bool, get_set, delimiter: str) -> tuple[list[tuple[str, str]], object]:
    """``([(field, problem)], label)`` of a manifest row whose columns are fine. ``multilabel``: the label set
    (a tuple of label texts) from the cell (:func:`parse_label_cell`) or the 0/1 columns ``get_set``
    (:func:`row_from_columns`); else the cell itself, refused (naming ``data.task``) when it holds several
    labels (:func:`looks_multilabel`)."""
    if not multilabel:
        if looks_multilabel(label, delimiter):
            why = (f"label {label!r} holds several labels (a JSON list, or text split on data.label_delimiter "
                   f"{delimiter!r}); set data.task: multilabel for a multi-label manifest")
            return [("task", why)], label
        return [], label
    if get_set is not None:
        labels, problem = row_from_columns(row, get_set)
        return ([("label_columns", problem)] if problem else []), labels
    labels, problem = parse_label_cell(label, delimiter)
    return ([("manifest", problem)] if problem else []), labels


def split_rows(raw: dict[str, list], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Split ``raw["train"]`` (``{split: [(rel, label set, where, file, pos)]}`` of
    :func:`trainer.data.manifest.list_manifest`) into train, val and test in place (:func:`iterative_split`).

    Raises:
        DataError: the manifest has val rows (or test rows and ``test_fraction`` > 0).
    """
    for split, field, fraction in (("val", "val_fraction", val_fraction), ("test", "test_fraction", test_fraction)):
        if raw[split] and fraction:
            raise DataError(f"data.{field}: the manifest has {len(raw[split])} {split} row(s) (e.g. "
                            f"{raw[split][0][2]}); unset data.{field} to use them as they are")
    pool = raw["train"]
    parts = iterative_split([row[1] for row in pool], [row[0] for row in pool],
                            {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction,
                             "test": test_fraction}, seed)
    raw["train"] = [row for row, s in zip(pool, parts) if s == "train"]
    raw["val"] = [row for row, s in zip(pool, parts) if s == "val"]
    raw["test"] += [row for row, s in zip(pool, parts) if s == "test"]
