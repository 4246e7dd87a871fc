"""The images ``finetune predict`` (``launch/predict.py``) reads: batches of decoded images with their names and true labels.

``images`` (the ``--images`` argument) is one of:

* an image folder, searched recursively (image suffixes only, hidden names skipped, sorted): a file
  whose parent folder is named like a class (``val/ants/x.jpg``) has that class as its true label
  (single-label only; a multi-label model gets no true label set from folders);
* a single image file (its parent folder as for a folder);
* a CSV list of files (``.csv``, header row): the path column (``path_column``, else the first of
  ``path, filepath, filename, file, image...`` as in manifests, else the first column), paths relative
  to the CSV's folder; an optional label column (``label_column``, else ``label, class...``; multi-label
  also ``labels, tags`` first) gives the true label (a class name or index); multi-label: the true label
  set, the cell split on the checkpoint's ``data.label_delimiter`` (:func:`trainer.data.multilabel.parse_label_cell`;
  an empty cell is the empty set), or, for a checkpoint trained on 0/1 class columns (``data.label_columns``),
  the CSV's columns named like the classes (all of them) when it has them;
* shards: a ``.tar`` file, a brace pattern / glob / URL, or a folder holding ``*.tar`` or a
  ``dataset.json``; the name is the sample's stored ``path.txt`` (else its key), the true label its
  ``cls`` (multi-label: its ``labels.json`` set) when the ``dataset.json`` beside the shards has the checkpoint's
  classes.

Single-label true labels that are not classes of the checkpoint are left empty (unknown). A multi-label CSV list
is read once in the main process before any work: a label that is not a class (nor a class index), an empty label
between two delimiters or a 0/1 cell holding something else is a :class:`DataError` naming the file, line and label.

Decoding (:func:`trainer.data.decode.decode_image_bytes` then the eval transform) happens in the DataLoader
workers; an unreadable image or shard becomes a row with its error instead of stopping the run.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from trainer.data.decode import decode_image_bytes
from trainer.data.extensions import IMAGE_EXTENSIONS, IMAGE_FIELDS
from trainer.data.listing import DataError, files_under

TrueLabel = str | tuple[int, ...] | None
"""A true label: single-label the class name (``""``: unknown); multi-label the sorted class indices of the set
(``()``: a negative) or None (unknown)."""


def _is_shards(path: Path, spec: str) -> bool:
    if path.is_dir():
        return (path / "dataset.json").is_file() or any(p.suffix == ".tar" for p in path.iterdir())
    return spec.endswith(".tar") or "://" in spec or spec.startswith("pipe:") or any(c in spec for c in "{*?[")


class ImageSource(IterableDataset):
    """Batches ``{"name": [str], "true": [TrueLabel], "image": (n, 3, S, S) uint8 | None, "ok": [bool],
    "error": [str]}`` of an image folder, image file, CSV list or shards (see the module docstring), decoded in
    the workers. ``image`` holds the ``n`` readable images of the batch, in order (``ok`` marks them).

    Args:
        images: the ``--images`` argument. classes: the checkpoint's class names (true labels).
        transform: ``(3, H, W) uint8 -> (3, S, S) uint8`` (the eval transform).
        batch_size: images per batch. path_column, label_column: CSV columns (name or 0-based index).
        multilabel: true labels are label sets (:data:`TrueLabel`), read as the module docstring says.
        label_delimiter: multi-label: the text between two labels of a CSV cell (the checkpoint's
            ``data.label_delimiter``).
        label_columns: multi-label: the checkpoint was trained on 0/1 class columns (``data.label_columns``):
            a CSV list with a column per class gives the sets from them.

    Raises:
        FileNotFoundError: ``images`` does not exist. DataError: a CSV without the named column; multi-label:
            a bad label (see the module docstring), naming the file, line and label.
    """

    def __init__(self, images: str, classes: list[str], transform, batch_size: int, path_column=None,
                 label_column=None, *, multilabel: bool = False, label_delimiter: str = "|",
                 label_columns: bool = False):
        self.spec, self.path = str(images), Path(images)
        self.classes, self.transform, self.batch_size = list(classes), transform, batch_size
        self.path_column, self.label_column = path_column, label_column
        self.multilabel, self.delimiter, self.label_columns = multilabel, label_delimiter, label_columns
        self.shards = None
        if _is_shards(self.path, self.spec):
            from trainer.data.meta import read_meta
            from trainer.data.sources import resolve_shards

            self.shards = resolve_shards(self.spec)
            meta = Path(self.shards[0]).parent / "dataset.json" if "://" not in self.shards[0] else None
            self.shard_labels = meta is not None and meta.is_file() and read_meta(meta).classes == self.classes
        elif not self.path.exists():
            raise FileNotFoundError(f"--images: no such file or folder: {self.path}")
        elif self.path.suffix.lower() == ".csv":
            self._csv_columns()  # check the columns now, in the main process
            if multilabel:
                for _ in self.files():  # and every label set (a worker's error would be a traceback)
                    pass

    # ---- the listed files: (name to read, true label) in input order
    def _is_csv(self) -> bool:
        return self.path.is_file() and self.path.suffix.lower() == ".csv"

    def _csv_columns(self) -> tuple[int, int | None, list[int] | None]:
        """``(path column, label column or None, class columns or None)`` of the CSV list."""
        from trainer.data.manifest import LABEL_NAMES, PATH_NAMES
        from trainer.data.multilabel import LABEL_SET_NAMES

        with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = next(csv.reader(f), None) or []

        def find(spec, names, required):
            if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
                return int(spec)
            if spec is not None:
                if spec not in header:
                    raise DataError(f"--images: column {spec!r} not in {self.path} (columns: {header})")
                return header.index(spec)
            lower = [h.strip().lower() for h in header]
            return next((lower.index(n) for n in names if n in lower), 0 if required else None)
        class_cols = None
        if self.multilabel and self.label_columns and self.label_column is None:
            found = [c for c in self.classes if c in header]
            if found and len(found) < len(self.classes):
                missing = [c for c in self.classes if c not in header]
                raise DataError(f"--images: {self.path} has 0/1 columns for {len(found)} of the checkpoint's "
                                f"{len(self.classes)} classes; missing: {missing[:5]} (one column per class, or a "
                                f"label column)")
            class_cols = [header.index(c) for c in self.classes] if found else None
        label_names = LABEL_SET_NAMES + LABEL_NAMES if self.multilabel else LABEL_NAMES
        return find(self.path_column, PATH_NAMES, True), find(self.label_column, label_names, False), class_cols

    def _true(self, label: str) -> str:
        label = label.strip()
        if label in self.classes:
            return label
        return self.classes[int(label)] if label.isdigit() and int(label) < len(self.classes) else ""

    def _label_set(self, row: list[str], lcol: int | None, class_cols: list[int] | None, line: int) -> TrueLabel:
        """The true label set of a CSV row (sorted class indices) or None; raises DataError for a bad label."""
        from trainer.data.multilabel import binary_value, parse_label_cell

        where = f"--images: {self.path} line {line}"
        if class_cols is not None:
            out = []
            for i, col in enumerate(class_cols):
                flag = binary_value(row[col]) if col < len(row) else None
                if flag is None:
                    cell = row[col] if col < len(row) else "(missing)"
                    raise DataError(f"{where}: column {self.classes[i]!r} holds {cell!r} (want 0 or 1)")
                if flag:
                    out.append(i)
            return tuple(out)
        if lcol is None:
            return None
        labels, problem = parse_label_cell(row[lcol] if lcol < len(row) else "", self.delimiter)
        if problem:
            raise DataError(f"{where}: {problem}")
        index = {c: i for i, c in enumerate(self.classes)}
        out = set()
        for label in labels:
            if label in index:
                out.add(index[label])
            elif label.isdigit() and int(label) < len(self.classes):
                out.add(int(label))
            else:
                shown = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
                raise DataError(f"{where}: label {label!r} is not a class of the checkpoint ({len(self.classes)} "
                                f"classes: {shown})")
        return tuple(sorted(out))

    def files(self) -> Iterator[tuple[str, TrueLabel]]:
        """``(file name to read, true label)`` of every listed image, in input order (not for shards).

        Raises:
            DataError: multi-label CSV list: a bad label (see the module docstring).
        """
        if self._is_csv():
            pcol, lcol, class_cols = self._csv_columns()
            base = self.path.parent
            with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                rows = csv.reader(f)
                next(rows, None)
                for row in rows:
                    if row:
                        name = os.path.join(base, row[pcol]) if pcol < len(row) else ""
                        if self.multilabel:
                            yield name, self._label_set(row, lcol, class_cols, rows.line_num)
                        else:
                            label = row[lcol] if lcol is not None and lcol < len(row) else ""
                            yield name, self._true(label)
        elif self.path.is_file():
            yield str(self.path), self._parent_class(str(self.path))
        else:
            for rel in files_under(self.path):
                if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                    name = os.path.join(self.path, rel)
                    yield name, self._parent_class(name)

    def _parent_class(self, name: str) -> TrueLabel:
        if self.multilabel:
            return None
        parent = os.path.basename(os.path.dirname(os.path.abspath(name)))
        return parent if parent in self.classes else ""

    # ---- decoding
    def _decode(self, name: str, read) -> tuple[torch.Tensor | None, str]:
        try:
            return self.transform(decode_image_bytes(read())), ""
        except Exception as e:  # unreadable image: reported in the CSV's error column
            return None, " ".join(f"{type(e).__name__}: {e}".split())

    def _batch(self, items: list[tuple[str, TrueLabel, object]]) -> dict:
        out = {"name": [], "true": [], "ok": [], "error": []}
        imgs = []
        for name, true, read in items:
            img, err = self._decode(name, read)
            out["name"].append(name)
            out["true"].append(true)
            out["ok"].append(img is not None)
            out["error"].append(err)
            if img is not None:
                imgs.append(img)
        out["image"] = torch.stack(imgs) if imgs else None
        return out

    def _shard_true(self, s: dict) -> TrueLabel:
        if self.multilabel:
            from trainer.data.multilabel import loads_labels

            if not self.shard_labels or "labels.json" not in s:
                return None
            try:
                return loads_labels(s["labels.json"], len(self.classes))
            except ValueError:  # a damaged label set: unknown
                return None
        cls = s.get("cls", b"").decode("ascii", "replace").strip()
        return self.classes[int(cls)] if self.shard_labels and cls.isdigit() and int(cls) < len(self.classes) else ""

    def _samples(self, shards: list[str]) -> Iterator[tuple[str, TrueLabel, object]]:
        from trainer.data.stream import iter_shard

        for url in shards:
            try:
                for s in iter_shard(url):
                    name = os.fsdecode(s["path.txt"]) if "path.txt" in s else s["__key__"]
                    data = next((s[e] for e in IMAGE_FIELDS if e in s), b"")
                    yield name, self._shard_true(s), (lambda d=data: d)
            except Exception as e:  # unreadable shard: one row naming it
                yield url, None if self.multilabel else "", (lambda e=e: _raise(e))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.shards is not None:  # worker w reads shards w, w + nw, ...
            items = self._samples(self.shards[wid::nw])
        else:  # batch k (of consecutive files) is decoded by worker k % nw: the loader yields input order
            items = ((f, t, (lambda f=f: _read(f))) for i, (f, t) in enumerate(self.files())
                     if (i // self.batch_size) % nw == wid)
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)


def _read(name: str) -> bytes:
    with open(name, "rb") as f:
        return f.read()


def _raise(e: BaseException):
    raise e
