"""A :class:`~trainer.data.listing.Listing` -> WebDataset shards + ``dataset.json`` (also ``launch/make_shards.py``).

Output in ``out`` (written in a staging folder and committed when complete, one writer at a time under
the folder's lock, see :mod:`trainer.data.staging`: a kill at any moment leaves the old state or the
finished one, and a reader never finds ``out`` missing):

* ``{split}-{000000..}.tar``: shard ``i`` of a split holds the listed items ``i*S .. (i+1)*S - 1``
  (``S = max_samples_per_shard``, the listing's fixed order) minus the unreadable ones; a shard that
  reaches ``max_bytes_per_shard`` continues in ``{split}-{i:06d}_1.tar``, ``_2``... The names do not
  depend on how many processes wrote them. One sample = three tar members (PAX format) with one key:

  - ``<key>.<ext>``: the image bytes. JPEG, PNG, WebP and GIF are stored byte for byte as found
    (``ext`` from the *detected* format, so a PNG named .jpg is stored as png); any other format PIL
    reads (BMP, TIFF, PPM, ...) is re-encoded losslessly to PNG (first frame).
  - ``<key>.cls``: the integer label as ASCII text (the WebDataset convention); a multi-label sample
    (``Listing.task == "multilabel"``) has ``<key>.labels.json`` instead: its label set as a JSON list of
    sorted, distinct class indices (``[0, 3]``; ``[]`` for a negative), ASCII; no ``cls``.
  - ``<key>.path.txt``: the item's name (relative to the data root or the manifest's folder) as the
    raw bytes of the file name (``os.fsencode``): UTF-8 text for UTF-8 names, and any other name
    byte for byte (decode with ``os.fsdecode``, which round-trips through surrogate escapes).

  The key is that name without its extension, as printable UTF-8 (:func:`trainer.data.listing.printable`:
  undecodable bytes and control characters such as a newline become ``\\xNN`` / ``\\n``), with '.'
  replaced by '_' (WebDataset splits key and extension at the first dot), prefixed with ``<split>/``
  for class-folder and manifest layouts, and cut to 180 characters + a hash when longer; a clash gets
  ``_1``, ``_2`` in listing order. Examples: ``train/ants/0013035``, ``val/AnnualCrop/AnnualCrop_1``.
* ``dataset.json`` (:mod:`trainer.data.meta`): the task, classes, per-split counts (multi-label: images
  carrying each class), shards, skipped files
  (``path``, ``reason``, ``where``: manifest file and line), the source's fingerprint, and leaks.

Every file is decoded before it is written (PIL ``verify()`` then a full ``load()``): missing, empty,
truncated or unreadable files are never written; they are listed in one warning per split and in
``skipped``. ``strict=True`` raises instead, listing them all, and nothing is committed.

Leaks: every written image's bytes are hashed (SHA-256); the same bytes in two splits
(``cross_split``), a path listed in two rows (``repeated_paths``) and the same bytes twice in one split
(``duplicates_within_split``) are counted with examples in ``dataset.json``'s ``leaks``;
:func:`leak_message` says what the run refuses under ``data.on_leak: error``.

Many images: shards are independent jobs. ``num_workers=N`` writes them with a process pool (progress
bar with ``progress=True``); ``worker_index=k`` writes only shards ``k, k+N, ...`` into the shared
staging folder ``.<out>.staging-of-N`` plus a partial metadata file, and the writer that finds all N
partial files merges them and commits (e.g. one writer per Slurm array task; every writer lists the
source itself, deterministically).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import webdataset as wds
from PIL import Image

from trainer.data import staging
from trainer.data.decode import check_pixels, describe_decode_error
from trainer.data.listing import DataError, Item, Listing, list_split_folders, printable
from trainer.data.meta import META_NAME, build_meta, load_json, write_meta
from trainer.data.multilabel import dumps_labels

log = logging.getLogger(__name__)

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
_MAX_KEY = 180
_EXAMPLES = 5


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
        raise ValueError(f"not a readable image: {describe_decode_error(exn, data)}") from None


def assign_keys(items: Sequence[Item], split: str, prefix: bool) -> list[str]:
    """Unique WebDataset keys for ``items`` (rules: module docstring)."""
    keys, used = [], set()
    for it in items:
        rel = printable(it.rel).replace(os.sep, "/")
        base_name = rel.rsplit("/", 1)[-1]
        stem = rel.rsplit(".", 1)[0] if "." in base_name else rel
        base = (f"{split}/{stem}" if prefix else stem).replace(".", "_")
        if len(base) > _MAX_KEY:
            base = base[:_MAX_KEY - 17] + "_" + hashlib.sha256(os.fsencode(it.rel)).hexdigest()[:16]
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _chunks(listing: Listing, per_shard: int) -> list[tuple[str, int, list[tuple[Item, str]]]]:
    """``(split, shard index, [(item, key)])`` for every shard, in split and index order."""
    jobs = []
    for split, items in listing.splits.items():
        pairs = list(zip(items, assign_keys(items, split, listing.key_prefix)))
        jobs += [(split, i // per_shard, pairs[i:i + per_shard]) for i in range(0, len(pairs), per_shard)]
    return jobs


def _write_chunk(folder: str, split: str, index: int, pairs: list[tuple[Item, str]], num_classes: int,
                 max_bytes: float, multilabel: bool = False) -> dict:
    """Check and write one shard (+ overflow files); return its counts, skipped files and hashes."""
    shards, sizes, counts, skipped, hashes = [], [], [0] * num_classes, [], []
    writer, nbytes = None, 0
    try:
        for item, key in pairs:
            try:
                with open(item.file, "rb") as f:
                    data = f.read()
                payload, ext = check_image(data)
            except (OSError, ValueError) as exn:
                reason = "file not found" if isinstance(exn, FileNotFoundError) else \
                    (str(exn) if isinstance(exn, ValueError) else f"{type(exn).__name__}: {exn.strerror}")
                skipped.append({"path": item.file, "reason": reason, "where": item.where})
                continue
            if writer is None or nbytes >= max_bytes:
                if writer is not None:
                    writer.close()
                name = f"{split}-{index:06d}" + (f"_{len(shards)}" if shards else "") + ".tar"
                writer = wds.TarWriter(os.path.join(folder, name), encoder=False, mtime=0, format="PAX_FORMAT")
                shards.append(name)
                sizes.append(0)
                nbytes = 0
            label = {"labels.json": dumps_labels(item.labels)} if multilabel else {"cls": str(item.label).encode()}
            nbytes += writer.write({"__key__": key, ext: payload, **label, "path.txt": os.fsencode(item.rel)})
            sizes[-1] += 1
            for y in (item.labels if multilabel else (item.label,)):
                counts[y] += 1
            hashes.append([hashlib.sha256(data).hexdigest()[:32], split, item.where or printable(item.rel)])
    finally:
        if writer is not None:
            writer.close()
    return {"split": split, "index": index, "shards": shards, "shard_sizes": sizes, "class_counts": counts,
            "skipped": skipped, "hashes": hashes}


def _merge(listing_classes: list[str], split_names: Sequence[str], parts: Sequence[dict]) -> dict:
    """Chunk results (any order) -> ``{split: split metadata}``."""
    splits = {s: {"num_samples": 0, "num_shards": 0, "class_counts": [0] * len(listing_classes), "shards": [],
                  "shard_sizes": [], "num_skipped": 0, "skipped": []} for s in split_names}
    for r in sorted(parts, key=lambda r: (list(split_names).index(r["split"]), r["index"])):
        m = splits[r["split"]]
        m["num_samples"] += sum(r["shard_sizes"])
        m["num_shards"] += len(r["shards"])
        m["class_counts"] = [a + b for a, b in zip(m["class_counts"], r["class_counts"])]
        m["shards"] += r["shards"]
        m["shard_sizes"] += r["shard_sizes"]
        m["num_skipped"] += len(r["skipped"])
        m["skipped"] += r["skipped"]
    return splits


def find_leaks(parts: Sequence[dict], repeated: Sequence) -> dict:
    """Cross-split images, repeated paths and within-split duplicates (counts + examples) from chunk hashes."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for r in parts:
        for digest, split, name in r["hashes"]:
            groups.setdefault(digest, []).append((split, name))
    cross = [g for g in groups.values() if len({s for s, _ in g}) > 1]
    within = [g for g in groups.values() if len(g) > 1 and len({s for s, _ in g}) == 1]

    def show(g):
        return " = ".join(f"{s}:{n}" for s, n in g[:3])
    return {"cross_split": {"count": len(cross), "examples": [show(g) for g in cross[:_EXAMPLES]]},
            "repeated_paths": {"count": len(repeated),
                               "examples": [f"{printable(p)} in {', '.join(w[:3])}" for p, w in repeated[:_EXAMPLES]]},
            "duplicates_within_split": {"count": len(within), "examples": [show(g) for g in within[:_EXAMPLES]]}}


def leak_message(leaks: dict) -> str | None:
    """One line describing images shared by two splits and paths listed twice, or None if there are none."""
    parts = []
    cross, rep = leaks.get("cross_split") or {}, leaks.get("repeated_paths") or {}
    if cross.get("count"):
        parts.append(f"{cross['count']} image(s) with the same bytes in two splits (e.g. {'; '.join(cross['examples'][:3])})")
    if rep.get("count"):
        parts.append(f"{rep['count']} path(s) listed more than once (e.g. {'; '.join(rep['examples'][:3])})")
    return " and ".join(parts) or None


def _report(meta: dict, strict: bool) -> None:
    """Log unreadable files, counts and leaks; with ``strict`` raise on unreadable files."""
    bad = []
    for split, m in meta["splits"].items():
        if m["skipped"]:
            listing = "\n".join(f"  {printable(s['path'])}{' (' + s['where'] + ')' if s['where'] else ''}: "
                                f"{s['reason']}" for s in m["skipped"])
            bad.append(listing)
            log.warning("write_shards: split '%s': %d unreadable file(s) not written:\n%s", split,
                        len(m["skipped"]), listing)
        log.info("write_shards: split '%s': %d samples in %d shard(s), %d skipped", split, m["num_samples"],
                 m["num_shards"], m["num_skipped"])
    dup = meta["leaks"]["duplicates_within_split"]
    if dup["count"]:
        log.warning("write_shards: %d image(s) appear more than once within a split, e.g. %s", dup["count"],
                    "; ".join(dup["examples"][:3]))
    if bad and strict:
        n = sum(m["num_skipped"] for m in meta["splits"].values())
        raise DataError(f"write_shards(strict=True): {n} unreadable file(s); no shards kept:\n" + "\n".join(bad))


def _partial_name(worker_index: int, num_workers: int) -> str:
    width = max(2, len(str(num_workers - 1)))
    return f"dataset.w{worker_index:0{width}d}-of-{num_workers:0{width}d}.json"


def _run_chunks(jobs, folder: Path, num_classes: int, max_bytes: float, num_workers: int, progress: bool,
                multilabel: bool = False):
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(j[2]) for j in jobs), unit="img", desc="writing shards", dynamic_ncols=True)
    results = []
    try:
        if num_workers <= 1:
            for split, index, pairs in jobs:
                results.append(_write_chunk(str(folder), split, index, pairs, num_classes, max_bytes, multilabel))
                if bar is not None:
                    bar.update(len(pairs))
        else:
            with ProcessPoolExecutor(num_workers) as pool:
                futures = {pool.submit(_write_chunk, str(folder), s, i, p, num_classes, max_bytes, multilabel): len(p)
                           for s, i, p in jobs}
                for fut in as_completed(futures):
                    results.append(fut.result())
                    if bar is not None:
                        bar.update(futures[fut])
    finally:
        if bar is not None:
            bar.close()
    return results


def write_listing(listing: Listing, out: str | os.PathLike, *, max_samples_per_shard: int = 1000,
                  max_bytes_per_shard: float = 1e9, num_workers: int = 1, worker_index: int | None = None,
                  strict: bool = False, overwrite: bool = False, progress: bool = False) -> dict:
    """Write ``listing`` as shards + ``dataset.json`` into ``out``, atomically (format: module docstring).

    Args:
        max_samples_per_shard, max_bytes_per_shard: shard size limits (samples; bytes).
        num_workers: N writer processes (``worker_index=None``: a local pool), or N independent writers.
        worker_index: write only shards ``k::N`` of N independent writers; the last one to finish commits.
        strict: unreadable files are an error (listing them all) instead of a warning; nothing is committed.
        overwrite: replace a complete dataset already in ``out``.
        progress: tqdm progress bar (images).

    Returns:
        the ``dataset.json`` dict (``worker_index`` set and others not done yet: this writer's partial dict).

    Raises:
        FileExistsError: ``out`` holds a dataset and not ``overwrite`` (also one another writer committed
            while this one waited for the lock). DataError: ``out`` holds other files. ValueError: bad
            arguments; with ``strict``, unreadable files. LockLost: the lock was taken over (nothing committed).
    """
    out = Path(out)
    if num_workers < 1 or (worker_index is not None and not 0 <= worker_index < num_workers):
        raise ValueError(f"write_shards: need num_workers >= 1 and 0 <= worker_index < num_workers, "
                         f"got num_workers={num_workers} worker_index={worker_index}")
    if max_samples_per_shard < 1 or max_bytes_per_shard <= 0:
        raise ValueError(f"write_shards: max_samples_per_shard ({max_samples_per_shard}) and "
                         f"max_bytes_per_shard ({max_bytes_per_shard}) must be positive")
    with staging.shard_lock(out):  # one writer at a time; a waiter then finds this one's dataset (module docstring)
        staging.recover(out)
        staging.check_target(out, overwrite)
        if worker_index is None:
            return _write_all(listing, out, max_samples_per_shard, max_bytes_per_shard, num_workers, strict,
                              progress)
        folder = staging.staging_dir(out, num_workers)
        folder.mkdir(exist_ok=True)
    # N independent writers share one staging folder: each writes its shards without the lock ...
    jobs = _chunks(listing, max_samples_per_shard)
    split_names = list(listing.splits)
    partial = folder / _partial_name(worker_index, num_workers)
    partial.unlink(missing_ok=True)
    parts = _run_chunks(jobs[worker_index::num_workers], folder, len(listing.classes), max_bytes_per_shard, 1,
                        progress, listing.task == "multilabel")
    write_meta(partial, {"parts": parts})
    names = [folder / _partial_name(k, num_workers) for k in range(num_workers)]
    if not all(p.is_file() for p in names):
        return build_meta(listing.classes, _merge(listing.classes, split_names, parts), task=listing.task)
    with staging.shard_lock(out):  # ... and the one that finds all partial files merges and commits
        if not folder.is_dir():  # another writer of the N committed first
            return load_json(out / META_NAME)
        parts = [r for p in names for r in load_json(p)["parts"]]
        meta = build_meta(listing.classes, _merge(listing.classes, split_names, parts), source=listing.source,
                          leaks=find_leaks(parts, listing.repeated), task=listing.task)
        _report(meta, strict)
        write_meta(folder / META_NAME, meta)
        staging.check_target(out, overwrite)
        return staging.commit(folder, out)


def _write_all(listing: Listing, out: Path, max_samples_per_shard: int, max_bytes_per_shard: float,
               num_workers: int, strict: bool, progress: bool) -> dict:
    """One process (and its pool) writes every shard into its own staging folder and commits (lock held)."""
    folder = staging.staging_dir(out)
    folder.mkdir(exist_ok=True)
    try:
        parts = _run_chunks(_chunks(listing, max_samples_per_shard), folder, len(listing.classes),
                            max_bytes_per_shard, num_workers, progress, listing.task == "multilabel")
        meta = build_meta(listing.classes, _merge(listing.classes, list(listing.splits), parts),
                          source=listing.source, leaks=find_leaks(parts, listing.repeated), task=listing.task)
        _report(meta, strict)
        write_meta(folder / META_NAME, meta)
        return staging.commit(folder, out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def merge_partial_metadata(out: str | os.PathLike, num_workers: int, listing: Listing) -> dict:
    """Redo the merge and commit of N independent writers of ``listing`` (all partial files must exist).

    Raises:
        FileNotFoundError: a writer's partial file is missing (named).
    """
    out = Path(out)
    folder = staging.staging_dir(out, num_workers)
    names = [folder / _partial_name(k, num_workers) for k in range(num_workers)]
    with staging.shard_lock(out):
        for k, p in enumerate(names):
            if not p.is_file():
                raise FileNotFoundError(f"merge_partial_metadata: {p} missing (writer {k} of {num_workers} not done)")
        parts = [r for p in names for r in load_json(p)["parts"]]
        meta = build_meta(listing.classes, _merge(listing.classes, list(listing.splits), parts),
                          source=listing.source, leaks=find_leaks(parts, listing.repeated), task=listing.task)
        write_meta(folder / META_NAME, meta)
        staging.check_target(out, overwrite=True)
        return staging.commit(folder, out)


def write_shards(root: str | os.PathLike, out: str | os.PathLike, *, splits: Sequence[str] | str | None = None,
                 **kw) -> dict:
    """Shards from ``root/{train,val[,test]}/<class>/<image>`` (:func:`list_split_folders` + :func:`write_listing`).

    Args:
        splits: split folders, a sequence or a comma-separated string (default: train, val, and test
            if present); ``train`` is always listed first and defines the class map.
        **kw: as :func:`write_listing`.

    Raises:
        DataError: no ``train`` folder, an unknown class folder or an empty training class (named);
            and as :func:`write_listing`.
    """
    split_list = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else splits
    if split_list is not None and "train" not in split_list:
        split_list = ["train", *split_list]
    return write_listing(list_split_folders(root, split_list), out, **kw)
