"""Image folder -> WebDataset shards + ``dataset.json`` (the implementation of ``launch/make_shards.py``).

Input layout: ``root/{train,val}/<class>/<image>`` (sub-folders inside a class folder are read too).
The class map is the sorted list of training class folder names (hidden names, starting with '.',
are ignored everywhere); it serves every split. A class folder in another split that training does
not know is an error naming it; an empty class folder is fine (count 0).

Output in ``out``:

* ``{split}-{000000..}.tar`` (one writer) or ``{split}-w{KK}-{000000..}.tar`` (writer KK of N), made
  with ``webdataset.ShardWriter`` (at most ``max_samples_per_shard`` samples / ``max_bytes_per_shard``
  bytes per shard, whichever comes first). One sample = three tar members with the same key:

  - ``<key>.<ext>``: the image bytes. JPEG, PNG, WebP and GIF are stored byte for byte as found
    (``ext`` from the *detected* format: jpg, png, webp, gif, so a PNG named .jpg is stored as png);
    any other format PIL reads (BMP, TIFF, PPM, ...) is re-encoded losslessly to PNG (first frame).
  - ``<key>.cls``: the integer label as ASCII text (the WebDataset convention).
  - ``<key>.path.txt``: the path relative to ``root`` (UTF-8), e.g. ``train/ants/0013035.jpg``.

  The key is that relative path without its extension, with '.' replaced by '_' (WebDataset splits
  the key from the extension at the first dot), e.g. ``train/ants/0013035``; a clash (``a.jpg`` and
  ``a.png``) gets a ``_1``, ``_2`` suffix, in sorted path order.
* ``dataset.json``::

    {"format_version": 1, "classes": [names in index order],
     "splits": {"train": {"num_samples": N, "num_shards": S, "class_counts": [..], "shards": [..],
                          "shard_sizes": [samples per shard], "num_skipped": K,
                          "skipped": [{"path": .., "reason": ..}]}, "val": {...}}}

Every file is decoded before it is written (PIL ``verify()`` then a full ``load()`` on a fresh
handle): empty, truncated or unreadable files are never written; they are listed (path and reason)
in one warning per split and in ``skipped``, with a count. ``strict=True`` raises instead, listing
every bad file, and removes the shards this call wrote.

Sharding millions of images
---------------------------
Listing, checking and writing is embarrassingly parallel. Writer ``k`` of ``N`` takes every N-th file
(``files[k::N]`` of the sorted listing) of every split and writes its own shard sequence
``{split}-wKK-*.tar``; the per-writer counts are merged into ``dataset.json``. Two ways to run it:

* one machine: ``--num_workers N`` runs the N writers in a process pool, then merges;
* several processes or nodes (e.g. a Slurm array ``0..N-1`` over a shared file system)::

    python launch/make_shards.py --root R --out O --num_workers N --worker_index $SLURM_ARRAY_TASK_ID

  Writer k writes its shards and ``O/dataset.wKK-of-NN.json``; whichever writer finishes last
  (sees all N partial files) merges them into ``O/dataset.json`` (atomic rename, so concurrent
  merges are harmless). ``--merge`` (``merge_partial_metadata``) redoes the merge by hand.

Every writer lists the whole tree (sorted), so all agree on the class map, the keys and who writes
what, without talking to each other.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import webdataset as wds
from PIL import Image

from trainer.data.decode import check_pixels
from trainer.utils.files import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def training_classes(root: str | os.PathLike) -> list[str]:
    """Sorted non-hidden folder names of ``root/train``: the class map (index = label).

    Raises:
        FileNotFoundError: ``root/train`` is missing. ValueError: it holds no class folder.
    """
    train = Path(root) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"write_shards: no training folder {train} (expected root/train/<class>/<image>)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not _is_hidden(p.name))
    if not classes:
        raise ValueError(f"write_shards: {train} holds no class folder")
    return classes


def _list_split(root: Path, split: str, classes: list[str]) -> list[tuple[str, int]]:
    """Sorted ``(path relative to root, label)`` for every non-hidden file of ``root/split``."""
    split_dir = root / split
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, int]] = []
    for entry in sorted(split_dir.iterdir()):
        if _is_hidden(entry.name):
            continue
        if not entry.is_dir():
            log.warning("write_shards: %s is not inside a class folder; ignored", entry)
            continue
        if entry.name not in index:
            raise ValueError(f"write_shards: class folder {entry} of split '{split}' is not a class of the "
                             f"training split {root / 'train'} (classes: {classes})")
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for fn in sorted(filenames):
                if not _is_hidden(fn):
                    rel = Path(dirpath, fn).relative_to(root).as_posix()
                    items.append((rel, index[entry.name]))
    items.sort()
    return items


def _assign_keys(rel_paths: Sequence[str]) -> list[str]:
    """Unique WebDataset keys: relative path without extension, '.' -> '_', clashes get _1, _2..."""
    keys, used = [], set()
    for rel in rel_paths:
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        base = stem.replace(".", "_")
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def check_image(data: bytes) -> tuple[bytes, str]:
    """Check that ``data`` is a decodable image; return the bytes to store and their extension.

    Returns:
        ``(bytes, ext)``: the original bytes for JPEG/PNG/WebP/GIF (ext jpg/png/webp/gif), else a
        lossless PNG re-encoding of the first frame (ext png).

    Raises:
        ValueError: empty data, more pixels than ``trainer.data.decode.check_pixels`` allows, or PIL
            cannot identify / verify / fully load it (reason in the message).
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(*im.size)  # before any pixel is decoded (decompression bombs)
            im.verify()  # structure / checksums (PNG CRC) without decoding pixels
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: reopen
            im.load()  # full decode: catches truncated JPEG/PNG data
            fmt = im.format
            if fmt in _KEEP_FORMATS:
                return data, _KEEP_FORMATS[fmt]
            if im.mode not in _PNG_MODES:
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            buf = io.BytesIO()
            im.save(buf, "PNG")
            return buf.getvalue(), "png"
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ValueError(f"not a readable image: {type(exn).__name__}: {exn}") from None


def _shard_pattern(split: str, worker_index: int, num_workers: int) -> str:
    if num_workers == 1:
        return f"{split}-%06d.tar"
    width = max(2, len(str(num_workers - 1)))
    return f"{split}-w{worker_index:0{width}d}-%06d.tar"


def _existing_shards(out: Path, pattern: str) -> list[Path]:
    regex = re.compile("^" + re.escape(pattern).replace("%06d", r"\d{6}") + "$")
    return sorted(p for p in out.iterdir() if regex.match(p.name)) if out.is_dir() else []


def _write_worker(root: str, out: str, classes: list[str], splits: Sequence[str], worker_index: int,
                  num_workers: int, max_samples_per_shard: int, max_bytes_per_shard: float, strict: bool,
                  overwrite: bool) -> dict:
    """Writer ``worker_index`` of ``num_workers``: check and write its files, return per-split metadata."""
    root_p, out_p = Path(root), Path(out)
    result: dict = {}
    for split in splits:
        items = _list_split(root_p, split, classes)
        keys = _assign_keys([rel for rel, _ in items])
        mine = list(zip(items, keys))[worker_index::num_workers]
        pattern = _shard_pattern(split, worker_index, num_workers)
        stale = _existing_shards(out_p, pattern)
        if stale:
            if not overwrite:
                raise FileExistsError(f"write_shards: {out_p} already holds {len(stale)} '{split}' shard(s) "
                                      f"({stale[0].name}, ...); pass overwrite=True (--overwrite) to replace them")
            for p in stale:
                p.unlink()
        counts = [0] * len(classes)
        shard_names: list[str] = []
        shard_sizes: list[int] = []
        skipped: list[dict] = []
        writer = None
        try:
            for (rel, label), key in mine:
                try:
                    payload, ext = check_image((root_p / rel).read_bytes())
                except (OSError, ValueError) as exn:
                    skipped.append({"path": str(root_p / rel), "reason": str(exn)})
                    continue
                if writer is None:
                    writer = wds.ShardWriter(str(out_p / pattern), maxcount=max_samples_per_shard,
                                             maxsize=max_bytes_per_shard, verbose=0, encoder=False, mtime=0)
                writer.write({"__key__": key, ext: payload, "cls": str(label).encode(),
                              "path.txt": rel.encode("utf-8")})
                name = Path(writer.fname).name
                if not shard_names or shard_names[-1] != name:
                    shard_names.append(name)
                    shard_sizes.append(0)
                shard_sizes[-1] += 1
                counts[label] += 1
        finally:
            if writer is not None:
                writer.close()
        result[split] = {"num_samples": sum(counts), "num_shards": len(shard_names), "class_counts": counts,
                         "shards": shard_names, "shard_sizes": shard_sizes, "num_skipped": len(skipped),
                         "skipped": skipped}
    return result


def _merge(classes: list[str], parts: Sequence[dict]) -> dict:
    """Merge per-writer split metadata (in writer order) into the ``dataset.json`` dict."""
    splits: dict = {}
    for part in parts:
        for split, r in part.items():
            m = splits.setdefault(split, {"num_samples": 0, "num_shards": 0, "class_counts": [0] * len(classes),
                                          "shards": [], "shard_sizes": [], "num_skipped": 0, "skipped": []})
            m["num_samples"] += r["num_samples"]
            m["num_shards"] += r["num_shards"]
            m["class_counts"] = [a + b for a, b in zip(m["class_counts"], r["class_counts"])]
            m["shards"] += r["shards"]
            m["shard_sizes"] += r["shard_sizes"]
            m["num_skipped"] += r["num_skipped"]
            m["skipped"] += r["skipped"]
    return {"format_version": FORMAT_VERSION, "classes": list(classes), "splits": splits}


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def _report(meta: dict, strict: bool, out: Path) -> None:
    """Log the unreadable files and counts; with ``strict``, delete the shards in ``meta`` and raise."""
    bad = [(split, s) for split, m in meta["splits"].items() for s in m["skipped"]]
    for split, m in meta["splits"].items():
        if m["skipped"]:
            listing = "\n".join(f"  {s['path']}: {s['reason']}" for s in m["skipped"])
            log.warning("write_shards: split '%s': %d unreadable file(s) not written:\n%s",
                        split, len(m["skipped"]), listing)
        log.info("write_shards: split '%s': %d samples in %d shard(s), %d skipped", split, m["num_samples"],
                 m["num_shards"], m["num_skipped"])
    if bad and strict:
        for m in meta["splits"].values():
            for name in m["shards"]:
                (out / name).unlink(missing_ok=True)
        listing = "\n".join(f"  {s['path']}: {s['reason']}" for _, s in bad)
        raise ValueError(f"write_shards(strict=True): {len(bad)} unreadable file(s); no shards kept:\n{listing}")


def _partial_name(worker_index: int, num_workers: int) -> str:
    width = max(2, len(str(num_workers - 1)))
    return f"dataset.w{worker_index:0{width}d}-of-{num_workers:0{width}d}.json"


def merge_partial_metadata(out: str | os.PathLike, num_workers: int) -> dict:
    """Merge ``out/dataset.wKK-of-NN.json`` of writers 0..N-1 into ``out/dataset.json``; return it.

    Raises:
        FileNotFoundError: a writer's partial file is missing (named). ValueError: class maps differ.
    """
    out_p = Path(out)
    parts, classes = [], None
    for k in range(num_workers):
        p = out_p / _partial_name(k, num_workers)
        if not p.is_file():
            raise FileNotFoundError(f"merge_partial_metadata: {p} missing (writer {k} of {num_workers} not done)")
        part = json.loads(p.read_text())
        if classes is not None and part["classes"] != classes:
            raise ValueError(f"merge_partial_metadata: {p} has classes {part['classes']}, writer 0 has {classes}")
        classes = part["classes"]
        parts.append(part["splits"])
    meta = _merge(classes, parts)
    _write_json_atomic(out_p / "dataset.json", meta)
    return meta


def write_shards(root: str | os.PathLike, out: str | os.PathLike, *,
                 splits: Sequence[str] | str = ("train", "val"), max_samples_per_shard: int = 1000,
                 max_bytes_per_shard: float = 1e9, num_workers: int = 1, worker_index: int | None = None,
                 strict: bool = False, overwrite: bool = False) -> dict:
    """Write WebDataset shards and ``out/dataset.json`` from an image folder (format: module docstring).

    Args:
        root: image folder with ``train/<class>/...`` (and the other ``splits``).
        out: output folder (created).
        splits: split folder names, a sequence or a comma-separated string; ``train`` always defines
            the class map, even when it is not written.
        max_samples_per_shard, max_bytes_per_shard: shard size limits (samples; bytes).
        num_workers: N writers (files ``[k::N]`` each); with ``worker_index=None`` all N run here in
            a process pool.
        worker_index: run only writer k of N (multi-node); writes ``dataset.wKK-of-NN.json`` and merges
            into ``dataset.json`` once all N partial files exist.
        strict: unreadable files are an error (listing them all) instead of a warning.
        overwrite: replace existing shards of the same names; otherwise they are an error.

    Returns:
        the ``dataset.json`` dict (for ``worker_index`` set: this writer's partial dict, with the same
        layout).

    Raises:
        FileNotFoundError: ``root/train`` or ``root/<split>`` missing (named).
        ValueError: a class folder unknown to training (named); with ``strict``, unreadable files.
        FileExistsError: shards already in ``out`` and not ``overwrite``.
    """
    root_p, out_p = Path(root), Path(out)
    split_list = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
    if num_workers < 1 or (worker_index is not None and not 0 <= worker_index < num_workers):
        raise ValueError(f"write_shards: need num_workers >= 1 and 0 <= worker_index < num_workers, "
                         f"got num_workers={num_workers} worker_index={worker_index}")
    if max_samples_per_shard < 1 or max_bytes_per_shard <= 0:
        raise ValueError(f"write_shards: max_samples_per_shard ({max_samples_per_shard}) and "
                         f"max_bytes_per_shard ({max_bytes_per_shard}) must be positive")
    classes = training_classes(root_p)
    for split in split_list:
        if not (root_p / split).is_dir():
            raise FileNotFoundError(f"write_shards: split folder {root_p / split} not found (splits={split_list})")
        _list_split(root_p, split, classes)  # fail early on unknown class folders, before any writing
    out_p.mkdir(parents=True, exist_ok=True)
    args = (str(root_p), str(out_p), classes, split_list)
    rest = (max_samples_per_shard, max_bytes_per_shard, strict, overwrite)
    if worker_index is not None:
        part = _write_worker(*args, worker_index, num_workers, *rest)
        meta = _merge(classes, [part])
        _report(meta, strict, out_p)
        _write_json_atomic(out_p / _partial_name(worker_index, num_workers), meta)
        if all((out_p / _partial_name(k, num_workers)).is_file() for k in range(num_workers)):
            merge_partial_metadata(out_p, num_workers)
        return meta
    if num_workers == 1:
        parts = [_write_worker(*args, 0, 1, *rest)]
    else:
        with ProcessPoolExecutor(num_workers) as pool:
            futures = [pool.submit(_write_worker, *args, k, num_workers, *rest) for k in range(num_workers)]
            parts = [f.result() for f in futures]
    meta = _merge(classes, parts)
    _report(meta, strict, out_p)
    _write_json_atomic(out_p / "dataset.json", meta)
    return meta


