"""One split of any data source the trainer reads -> the WebDataset shards to stream it (``finetune-evaluate``).

:func:`shards_for_split` resolves ``data`` (checked in this order):

* shards: a folder holding ``dataset.json`` (or that file): the split's shards; or any shard spec
  (:func:`trainer.data.sources.resolve_shards`: brace pattern, glob, URL) with ``meta`` (a ``dataset.json``) for
  the class names and task;
* a manifest file (``MANIFEST_SUFFIXES``, :mod:`trainer.data.manifest`): with a split column its ``split`` rows,
  without one every row;
* an image folder: ``root/{train,val,test}/<class>/<image>`` (the ``split`` folder; classes from ``train/``), or
  ``root/<class>/<image>`` (every image; classes = the class folders). Folders carry one label per image: refused
  for ``task="multilabel"``.

Manifests and folders are listed by :mod:`trainer.data.listing` / :mod:`trainer.data.manifest` and written into
shards by the main process (:func:`trainer.data.prepare.write_or_reuse`: unreadable files skipped and counted; the
other ranks wait, :func:`trainer.distributed.wait.main_first`) into ``shard_dir`` (kept, reused while the source is
unchanged, refused when it changed) or into ``tmp_dir`` (emptied first, removed by :meth:`SplitShards.remove_tmp`).
Messages name the options of ``launch/evaluate.py`` (``--data``, ``--split``, ``--meta``, ``--shard_dir``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config.fields import ConfigError
from trainer.data.listing import DataError, Listing
from trainer.data.meta import META_NAME, TASKS, DatasetMeta, read_meta

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
"""File suffixes (lower case) read as a manifest; any other file given as ``data`` is refused."""

SHARD_SAMPLES = 256
"""Samples per shard written from a folder or manifest."""


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split, as :func:`shards_for_split` found or wrote them.

    Attributes:
        urls: shard paths / URLs in order (every rank gets the same list).
        meta: the ``dataset.json`` of the shards (written or read).
        classes: class names in label order (of ``dataset.json``, or of the listing the shards were written from).
        classes_from: where the classes come from, for messages: the ``dataset.json``, the label map, the manifest,
            ``root/train`` or the class-folder root.
        num_skipped: files of the split not in the shards (unreadable when written).
        tmp_dir: the temporary shard folder to remove after use (:meth:`remove_tmp`), or None.
    """

    urls: list[str]
    meta: DatasetMeta
    classes: list[str]
    classes_from: str
    num_skipped: int
    tmp_dir: Path | None = None

    def remove_tmp(self, accelerator=None) -> None:
        """Remove :attr:`tmp_dir` (nothing when None); every rank calls it, the main process removes once all
        ranks are done (``accelerator``: an ``accelerate.Accelerator`` or None for one process)."""
        _remove(self.tmp_dir, accelerator)


def _remove(tmp: Path | None, accelerator) -> None:
    if tmp is None:
        return
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    if accelerator is None or accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)


def _split_listing(data: Path, split: str, *, path_column, label_column, split_column, label_map, task: str,
                   label_delimiter: str, label_columns) -> tuple[Listing, str]:
    """A folder or manifest -> (:class:`Listing` holding only ``split``, where its classes come from).

    Raises:
        DataError: no such split, an unreadable source (from the data layer, named), an image folder for
            ``task="multilabel"`` (folders carry one label per image, not label sets).
    """
    from trainer.data.listing import list_class_folders, list_split_folders, split_folder
    from trainer.data.manifest import has_split_column, list_manifest

    if task == "multilabel" and not data.is_file():
        raise DataError(f"--data: {data} is an image folder, and folders carry no label sets (one class per image); "
                        "the checkpoint is a multi-label model (data.task: multilabel): evaluate it on a manifest "
                        "(CSV/JSONL with label sets) or multi-label shards")
    if data.is_file():
        cols = {"path_column": path_column, "label_column": label_column, "label_map": label_map, "task": task,
                "label_delimiter": label_delimiter, "label_columns": label_columns}
        if has_split_column(data, split_column):
            full = list_manifest(str(data), split_column=split_column, **cols)
        else:  # every row is the split: the same file as train (class map) and val (the rows)
            full = list_manifest({"train": str(data), "val": str(data)}, **cols)
            full.splits = {split: full.splits["val"]}
        where = label_map if label_map else str(data)
    elif (data / "train").is_dir():
        if split_folder(data, split) is None:
            raise DataError(f"--split: {data} has no {split}/ folder")
        full, where = list_split_folders(data, splits=[split]), str(data / "train")
    else:  # root/<class>/<image>: every image (the stratified split's val part at fraction 1)
        full = list_class_folders(data, val_fraction=1.0)
        full.splits = {split: full.splits["val"]}
        where = str(data)
    if split not in full.splits or not full.splits[split]:
        raise DataError(f"--split: {data} has no {split} rows or images (splits: {sorted(full.splits)})")
    source = {**full.source, "params": {**full.source["params"], "evaluate_split": split}}
    return Listing(classes=full.classes, splits={split: full.splits[split]}, source=source,
                   key_prefix=full.key_prefix, task=full.task), where


def _write_or_reuse(listing: Listing, shard_dir: Path, num_workers: int) -> None:
    from trainer.data import staging
    from trainer.data.prepare import write_or_reuse

    with staging.shard_lock(shard_dir):  # another evaluation writing this folder: wait, then reuse or refuse
        staging.recover(shard_dir)
        try:
            write_or_reuse(listing, shard_dir, max_samples_per_shard=SHARD_SAMPLES, num_workers=max(1, num_workers))
        except ConfigError as e:  # the data.* fields are the command's options
            raise ConfigError(str(e).replace("data.shard_dir", "--shard_dir").replace("data.", "--")) from None


def shards_for_split(data: str | os.PathLike, split: str, *, meta: str | os.PathLike | None = None,
                     shard_dir: str | os.PathLike | None = None, tmp_dir: str | os.PathLike | None = None,
                     path_column: int | str | None = None, label_column: int | str | None = None,
                     split_column: int | str | None = None, label_map: str | None = None, task: str = "multiclass",
                     label_delimiter: str = "|", label_columns: list[str] | None = None, num_workers: int = 2,
                     accelerator=None, check: Callable[[list[str], str, str], None] | None = None) -> SplitShards:
    """The shards of split ``split`` of ``data`` (shards, a manifest or an image folder; see the module docstring),
    written from a manifest or folder when needed.

    Args:
        data: a folder holding ``dataset.json`` or that file, a shard spec (with ``meta``), a manifest, a folder.
        split: the split (``train``, ``val``, ``test``; not checked here).
        meta: the ``dataset.json`` of a shard spec given as ``data``.
        shard_dir: write the shards of a manifest or folder here and keep them (reused while the source is
            unchanged); None: into ``tmp_dir``.
        tmp_dir: the temporary shard folder when ``shard_dir`` is None (one path for every rank; emptied before
            writing; returned as :attr:`SplitShards.tmp_dir` and removed on an error).
        path_column, label_column, split_column, label_map, task, label_delimiter, label_columns: how a manifest is
            read, as the ``data.*`` fields (:func:`trainer.data.manifest.list_manifest`); ``task="multilabel"`` also
            refuses image folders.
        num_workers: shard-writing processes (at least 1).
        accelerator: an ``accelerate.Accelerator`` (the main process writes, the others wait), or None (one process).
        check: called as ``check(classes, classes_from, task)`` once the data's classes and task are known, before
            any shard is resolved or written (the task of ``dataset.json``, or ``task`` for a listing); raise to
            refuse the data.

    Returns:
        :class:`SplitShards`; its ``tmp_dir`` is to be removed with :meth:`SplitShards.remove_tmp` after use.

    Raises:
        ConfigError: ``meta`` (or the folder's ``dataset.json``) not found; ``shard_dir`` holds shards of another
            source (naming ``--shard_dir``).
        DataError: a file that is not a manifest, a split the data does not have (naming ``--split``), an image
            folder for ``task="multilabel"``, an unreadable manifest or folder (from the data layer, named).
        FileNotFoundError: ``data`` does not exist (a folder or manifest), or a shard spec matches nothing.
        ValueError: ``task`` not in ``TASKS``, or neither ``shard_dir`` nor ``tmp_dir`` where shards are written.
        whatever ``check`` raises.
    """
    from trainer.data.sources import resolve_shards
    from trainer.distributed.wait import main_first

    if task not in TASKS:
        raise ValueError(f"shards_for_split: task {task!r} is not one of {list(TASKS)}")
    path = Path(data)
    if meta is not None or (path / META_NAME).is_file() or path.name == META_NAME:
        meta_path = Path(meta) if meta is not None else (path if path.name == META_NAME else path / META_NAME)
        if not meta_path.is_file():
            raise ConfigError(f"--meta: dataset metadata not found: {meta_path}")
        dmeta = read_meta(meta_path)
        if check is not None:
            check(dmeta.classes, str(meta_path), dmeta.task)
        if meta is not None:
            urls = resolve_shards(data)
        elif split in dmeta.splits and dmeta.splits[split].num_samples:
            urls = dmeta.shard_urls(split)
        else:
            raise DataError(f"--split: {meta_path} has no {split} samples (splits: {sorted(dmeta.splits)})")
        skipped = dmeta.splits[split].num_skipped if split in dmeta.splits else 0
        return SplitShards(urls, dmeta, list(dmeta.classes), str(meta_path), skipped)

    if not path.exists():
        raise FileNotFoundError(f"--data: no such file or folder: {path}")
    if path.is_file() and path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"--data: {path} is not a manifest ({', '.join(MANIFEST_SUFFIXES)}), a folder or "
                        f"a {META_NAME}")
    listing, where = _split_listing(path, split, path_column=path_column, label_column=label_column,
                                    split_column=split_column, label_map=label_map, task=task,
                                    label_delimiter=label_delimiter, label_columns=label_columns)
    if check is not None:
        check(listing.classes, where, listing.task)
    if shard_dir is None and tmp_dir is None:
        raise ValueError("shards_for_split: give shard_dir or tmp_dir (where the shards of a folder or manifest go)")
    tmp = Path(tmp_dir) if shard_dir is None else None
    target = Path(shard_dir) if shard_dir is not None else tmp

    def write():
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted evaluation
        _write_or_reuse(listing, target, num_workers)

    try:
        if accelerator is None:
            write()
        else:
            main_first(write, accelerator, what="writing shards", errors=(ConfigError, DataError))
        dmeta = read_meta(target)
    except BaseException:
        _remove(tmp, accelerator)
        raise
    return SplitShards(dmeta.shard_urls(split), dmeta, list(listing.classes), where, dmeta.splits[split].num_skipped,
                       tmp)
