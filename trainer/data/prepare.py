"""Get the run's data ready: download the image folder if asked, write shards once, read the metadata.

Only the main process downloads or writes shards; the other ranks wait at a barrier and then read
the same ``dataset.json``. Shards are written once per ``data.shard_dir`` and reused by later runs.

Checksums: a downloaded archive is checked against ``data.download_sha256`` (SHA-256 of the zip) when
given, and the unpacked image tree against ``data.tree_sha256`` (:func:`tree_sha256`: SHA-256 over the
sorted relative paths and bytes of every file under ``train/`` and ``val/``), so a corrupted or
different download is an error before anything trains.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import ConfigError, DataConfig
from trainer.data.meta import DatasetMeta, read_meta
from trainer.data.sources import resolve_shards
from trainer.utils.files import atomic_write, sha256_file

log = logging.getLogger("trainer")


@dataclass
class PreparedDataset:
    """Resolved data of a run.

    Attributes:
        meta: class names (index order) and per-split counts from ``dataset.json``.
        train_shards, val_shards: resolved shard URLs/paths.
        num_train_samples, num_val_samples: sample counts from the metadata.
    """

    meta: DatasetMeta
    train_shards: list[str]
    val_shards: list[str]
    num_train_samples: int
    num_val_samples: int


def tree_sha256(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> str:
    """SHA-256 hex digest over the sorted relative paths and contents of every file in ``root/<split>``."""
    root = Path(root)
    h = hashlib.sha256()
    for split in splits:
        for path in sorted(p for p in (root / split).rglob("*") if p.is_file()):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def download_image_folder(cfg: DataConfig) -> Path:
    """Fetch ``cfg.download_url`` (a zip holding ``<name>/{train,val}/...``) into ``cfg.download_dir``.

    Returns:
        The unpacked image root ``download_dir/<basename of data.root>``.

    Raises:
        ConfigError: no URL configured, a checksum mismatch (archive or tree), or a download failure,
            naming the field, URL and file.
    """
    if not cfg.download_url:
        raise ConfigError(f"data.root: folder not found: {cfg.root} (and no data.download_url to fetch it)")
    name = Path(cfg.root).name if cfg.root else "images"
    target = Path(cfg.download_dir) / name
    if target.is_dir():
        return target
    archive = Path(cfg.download_dir) / Path(cfg.download_url).name
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
    staging = Path(cfg.download_dir) / f".{name}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(staging)
    unpacked = staging / name if (staging / name).is_dir() else staging
    if cfg.tree_sha256:
        got = tree_sha256(unpacked)
        if got != cfg.tree_sha256:
            raise ConfigError(f"data.tree_sha256: images unpacked from {archive} hash to {got}, "
                              f"expected {cfg.tree_sha256}")
    unpacked.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _ensure_shards(cfg: DataConfig) -> None:
    """Main process only: write shards from ``cfg.root`` into ``cfg.shard_dir`` unless already there."""
    from trainer.data.shard_writer import write_shards

    meta_path = Path(cfg.shard_dir) / "dataset.json"
    if meta_path.is_file():
        return
    if cfg.root is None:
        raise ConfigError(f"data.shard_dir: no dataset.json in {cfg.shard_dir} and data.root is not set "
                          "(set data.root to an image folder, or data.train_shards/val_shards + data.meta)")
    root = Path(cfg.root)
    if not root.is_dir():
        root = download_image_folder(cfg)
    if not (root / "train").is_dir():
        raise ConfigError(f"data.root: {root} has no train/ folder (expected root/{{train,val}}/<class>/<image>)")
    log.info("writing shards from %s to %s", root, cfg.shard_dir)
    write_shards(root, cfg.shard_dir, max_samples_per_shard=cfg.samples_per_shard)


def prepare_dataset(cfg: DataConfig, accelerator) -> PreparedDataset:
    """Make sure shards and metadata exist (main process writes them), then resolve them on every rank.

    Raises:
        ConfigError: missing folder / metadata / shards, naming the config field and path.
    """
    explicit = cfg.train_shards is not None
    if not explicit:
        err = None
        if accelerator.is_main_process:
            try:
                _ensure_shards(cfg)
            except Exception as e:  # let the other ranks leave the barrier, then raise everywhere
                err = e
        accelerator.wait_for_everyone()
        if err is not None:
            raise err
    meta_path = Path(cfg.meta) if cfg.meta else Path(cfg.shard_dir) / "dataset.json"
    if not meta_path.is_file():
        raise ConfigError(f"data.meta: dataset metadata not found: {meta_path}")
    meta = read_meta(meta_path)
    try:
        train = resolve_shards(cfg.train_shards) if explicit else meta.shard_urls("train")
        val = resolve_shards(cfg.val_shards) if cfg.val_shards else meta.shard_urls("val")
    except KeyError as e:
        raise ConfigError(f"data.meta: {e.args[0]}") from None
    return PreparedDataset(meta=meta, train_shards=train, val_shards=val,
                           num_train_samples=meta.splits["train"].num_samples,
                           num_val_samples=meta.splits["val"].num_samples)


