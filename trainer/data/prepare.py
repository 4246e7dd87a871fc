"""Get the run's data ready: list the source, write shards once (or reuse them), read the metadata.

Which source (checked in this order, before anything is read or written):

1. ``data.train_shards`` set: those shards and ``data.meta`` / ``shard_dir/dataset.json``; nothing is written.
2. ``data.manifest`` (:mod:`trainer.data.manifest`) or ``data.root``: split folders, or class folders
   with ``data.val_fraction`` (:mod:`trainer.data.listing`). A ``data.root`` that does not exist is an
   error naming it, also when ``shard_dir`` holds shards, unless ``data.download: true`` fetches
   ``data.download_url`` into ``download_dir/<basename of root>``.
3. Neither set: ``shard_dir/dataset.json`` if it exists (shards written before), else ``download_url``
   fetched into ``download_dir/<archive name>``, else an error.

Reuse: ``dataset.json`` records the source's fingerprint (sorted relative paths + sizes + mtimes of
the files, or the manifest bytes) and parameters (split fractions and seed, manifest columns). The
same source reuses the shards; a changed one is refused with one line saying what changed (a
silently re-drawn split would leak validation images into training): delete ``shard_dir`` or point it
elsewhere to write new shards.

Only the main process lists and writes; the others wait without a collective deadline
(:func:`trainer.distributed.wait.main_first`). Checksums: a downloaded archive is checked against
``data.download_sha256``, the unpacked tree against ``data.tree_sha256`` (:func:`tree_sha256`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from trainer.config.schema import ConfigError, DataConfig
from trainer.data import staging
from trainer.data.listing import DataError, Listing, list_class_folders, list_split_folders, split_folder
from trainer.data.meta import DatasetMeta, read_meta
from trainer.data.sources import resolve_shards
from trainer.files.atomic import atomic_write, sha256_file

log = logging.getLogger("trainer")


@dataclass
class PreparedDataset:
    """Resolved data of a run.

    Attributes:
        meta: class names (index order) and per-split counts from ``dataset.json``.
        train_shards, val_shards: resolved shard URLs/paths; test_shards: None without a test split.
        num_train_samples, num_val_samples, num_test_samples: sample counts from the metadata (test: 0).
    """

    meta: DatasetMeta
    train_shards: list[str]
    val_shards: list[str]
    num_train_samples: int
    num_val_samples: int
    test_shards: list[str] | None = None
    num_test_samples: int = 0


def tree_sha256(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> str:
    """SHA-256 hex digest over the sorted relative paths and contents of every file in ``root/<split>``
    (``val``: the folder :func:`trainer.data.listing.split_folder` finds, e.g. ``validation/``).

    Raises:
        DataError: two validation folders.
    """
    root = Path(root)
    h = hashlib.sha256()
    for split in splits:
        folder = split_folder(root, split) or root / split
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def download_image_folder(cfg: DataConfig) -> Path:
    """Fetch ``cfg.download_url`` (a zip holding ``<name>/...``) into ``cfg.download_dir``.

    Returns:
        The unpacked image root ``download_dir/<name>``: ``name`` is the basename of ``data.root`` if
        set, else the archive's name without ``.zip``.

    Raises:
        ConfigError: no URL configured, a checksum mismatch (archive or tree), or a download failure,
            naming the field, URL and file.
    """
    if not cfg.download_url:
        raise ConfigError(f"data.root: folder not found: {cfg.root} (and no data.download_url to fetch it)")
    name = Path(cfg.root).name if cfg.root else Path(urlparse(cfg.download_url).path).stem or "images"
    target = Path(cfg.download_dir) / name
    if target.is_dir():
        return target
    archive = Path(cfg.download_dir) / Path(urlparse(cfg.download_url).path).name
    archive.parent.mkdir(parents=True, exist_ok=True)
    if not archive.is_file():
        log.info("downloading %s -> %s", cfg.download_url, archive)

        def download(tmp: Path) -> None:
            with urllib.request.urlopen(cfg.download_url, timeout=30) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        try:
            atomic_write(archive, download)
        except OSError as e:
            raise ConfigError(f"data.download_url: cannot download {cfg.download_url}: {e}") from e
    if cfg.download_sha256 and sha256_file(archive) != cfg.download_sha256:
        raise ConfigError(f"data.download_sha256: {archive} has SHA-256 {sha256_file(archive)}, "
                          f"expected {cfg.download_sha256} (delete it to download again)")
    staging_dir = Path(cfg.download_dir) / f".{name}.unpack"
    shutil.rmtree(staging_dir, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(staging_dir)
    unpacked = staging_dir / name if (staging_dir / name).is_dir() else staging_dir
    if cfg.tree_sha256:
        got = tree_sha256(unpacked)
        if got != cfg.tree_sha256:
            raise ConfigError(f"data.tree_sha256: images unpacked from {archive} hash to {got}, "
                              f"expected {cfg.tree_sha256}")
    unpacked.rename(target)
    shutil.rmtree(staging_dir, ignore_errors=True)
    return target


def build_listing(cfg: DataConfig) -> Listing | None:
    """The run's source as a :class:`Listing`, or None when existing shards are used as they are.

    Raises:
        ConfigError / DataError: naming the field, folder, file or row.
    """
    if cfg.manifest is not None:
        from trainer.data.manifest import list_manifest
        manifest = cfg.manifest if isinstance(cfg.manifest, str) else dict(cfg.manifest)
        return list_manifest(manifest, path_column=cfg.path_column, label_column=cfg.label_column,
                             split_column=cfg.split_column, label_map=cfg.label_map, task=cfg.task,
                             label_delimiter=cfg.label_delimiter, label_columns=cfg.label_columns,
                             val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)
    if cfg.root is None:
        if (Path(cfg.shard_dir) / "dataset.json").is_file():
            return None
        if not cfg.download_url:
            raise ConfigError(f"data.root: not set, and data.shard_dir {cfg.shard_dir} holds no dataset.json "
                              "(set data.root or data.manifest, or data.train_shards/val_shards + data.meta)")
        if cfg.task == "multilabel":
            raise ConfigError(f"data.task: multilabel needs data.manifest (CSV/JSONL); the image folders of "
                              f"data.download_url {cfg.download_url} give one label per image")
        root = download_image_folder(cfg)
    else:
        root = Path(cfg.root)
        if not root.is_dir():
            if not cfg.download:
                raise ConfigError(f"data.root: folder not found: {cfg.root}"
                                  + (" (set data.download: true to fetch data.download_url)" if cfg.download_url
                                     else ""))
            root = download_image_folder(cfg)
    if (root / "train").is_dir():
        if cfg.val_fraction is not None:
            raise ConfigError(f"data.val_fraction: {root} already has train/ (split folders); unset val_fraction")
        return list_split_folders(root)
    if cfg.val_fraction is None:
        raise ConfigError(f"data.val_fraction: {root} has no train/ folder; for class folders without a split "
                          "(root/<class>/<image>) set data.val_fraction (and optionally data.test_fraction)")
    return list_class_folders(root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                              seed=cfg.split_seed)


def source_change(old: dict, new: dict, shard_dir: str) -> str | None:
    """Why the shards in ``shard_dir`` (written from ``old``) do not fit the source ``new``, or None."""
    if not old:
        return None  # format 1: no record to compare (written by an older version)
    hint = f"delete {shard_dir} (or set data.shard_dir to a new folder) to write new shards"
    old_task, new_task = (d.get("params", {}).get("task", "multiclass") for d in (old, new))
    if old_task != new_task:
        return f"data.task: the shards in {shard_dir} were written for data.task: {old_task}, this run has " \
               f"{new_task}; {hint}"
    if old.get("layout") != new["layout"]:
        return f"data.shard_dir: {shard_dir} was written from a {old.get('layout')} source, this run has a " \
               f"{new['layout']} source; {hint}"
    for k, v in new["params"].items():
        if old.get("params", {}).get(k) != v:
            return f"data.{k}: {v!r} differs from the {old.get('params', {}).get(k)!r} the shards in {shard_dir} " \
                   f"were written with (the split would change); set it back, or {hint}"
    if old.get("files_sha256") != new["files_sha256"]:
        return f"data.shard_dir: the source changed since the shards in {shard_dir} were written " \
               f"({old.get('num_files')} -> {new['num_files']} files, or files renamed/modified); {hint}"
    return None


def ensure_shards(cfg: DataConfig, *, progress: bool = False) -> None:
    """Main process: make ``shard_dir`` hold shards of the configured source (write or reuse), holding
    ``shard_dir``'s lock (:func:`trainer.data.staging.shard_lock`): a run that finds another one writing
    the folder waits (logging who holds the lock), then reuses its shards or refuses them.

    Raises:
        ConfigError: a bad field or a changed source (one line naming it).
    """

    out = Path(cfg.shard_dir)
    try:
        with staging.shard_lock(out):  # a run writing this folder now: wait for it, then reuse or refuse
            staging.recover(out)
            listing = build_listing(cfg)
            if listing is None:
                return
            write_or_reuse(listing, out, max_samples_per_shard=cfg.samples_per_shard,
                           num_workers=cfg.shard_workers or min(8, os.cpu_count() or 1), progress=progress)
    except (DataError, FileExistsError) as e:
        raise ConfigError(str(e)) from None


def write_or_reuse(listing: Listing, out: Path, *, max_samples_per_shard: int, num_workers: int,
                   progress: bool = False) -> None:
    """Reuse the shards in ``out`` when they were written from ``listing``'s source, else write them there.

    The caller holds ``out``'s lock (:func:`trainer.data.staging.shard_lock`) and has completed or removed an
    interrupted write (:func:`trainer.data.staging.recover`).

    Raises:
        ConfigError: ``out`` holds shards of another source (:func:`source_change`, naming the ``data.*`` field).
    """
    from trainer.data.shard_writer import write_listing

    if (out / "dataset.json").is_file():
        problem = source_change(read_meta(out).source, listing.source, str(out))
        if problem:
            raise ConfigError(problem)
        log.info("reusing the shards in %s (same source)", out)
        return
    log.info("writing shards of %s into %s (%d process(es))", listing.source["location"], out, num_workers)
    write_listing(listing, out, max_samples_per_shard=max_samples_per_shard, num_workers=num_workers,
                  progress=progress)


def _leak_check(meta: DatasetMeta, on_leak: str) -> None:
    from trainer.data.shard_writer import leak_message

    msg = leak_message(meta.leaks)
    if msg is None:
        return
    if on_leak == "error":
        raise ConfigError(f"data.on_leak: {msg}; fix the data, or set data.on_leak: warn to train anyway")
    log.warning("data.on_leak=warn: %s", msg)


def prepare_dataset(cfg: DataConfig, accelerator, *, progress: bool = False) -> PreparedDataset:
    """Make sure shards and metadata exist (main process writes them; the others wait without a
    deadline), then resolve them on every rank.

    Raises:
        ConfigError: a bad field, a missing folder / metadata / shards, a changed source, leaks under
            ``data.on_leak: error``, a training class without a readable image; names the field and path.
    """
    from trainer.distributed.wait import main_first

    explicit = cfg.train_shards is not None
    if not explicit:
        main_first(lambda: ensure_shards(cfg, progress=progress), accelerator, what="writing shards",
                   errors=(ConfigError,))
    meta_path = Path(cfg.meta) if cfg.meta else Path(cfg.shard_dir) / "dataset.json"
    if not meta_path.is_file():
        raise ConfigError(f"data.meta: dataset metadata not found: {meta_path}")
    try:
        meta = read_meta(meta_path)
    except ValueError as e:
        raise ConfigError(f"data.meta: {e}") from None
    if meta.task != cfg.task:
        raise ConfigError(f"data.task: {cfg.task!r}, but the shards of {meta_path} were written for data.task: "
                          f"{meta.task} (their labels are {'label sets' if meta.task == 'multilabel' else 'single'}); "
                          "set data.task to match, or write new shards")
    _leak_check(meta, cfg.on_leak)
    counts = meta.splits["train"].class_counts if "train" in meta.splits else []
    if 0 in counts:
        raise ConfigError(f"data.shard_dir: training class {meta.classes[counts.index(0)]!r} has no readable image "
                          f"in {meta_path} (see its 'skipped' list)")
    try:
        train = resolve_shards(cfg.train_shards) if explicit else meta.shard_urls("train")
        val = resolve_shards(cfg.val_shards) if cfg.val_shards else meta.shard_urls("val")
        test = resolve_shards(cfg.test_shards) if cfg.test_shards else \
            (meta.shard_urls("test") if meta.splits.get("test") and meta.splits["test"].num_samples else None)
    except KeyError as e:
        raise ConfigError(f"data.meta: {e.args[0]}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"data.train_shards/val_shards/test_shards: {e}") from None
    return PreparedDataset(meta=meta, train_shards=train, val_shards=val,
                           num_train_samples=meta.splits["train"].num_samples,
                           num_val_samples=meta.splits["val"].num_samples, test_shards=test,
                           num_test_samples=meta.splits["test"].num_samples if test and "test" in meta.splits else 0)
