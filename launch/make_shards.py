"""Images -> WebDataset shards + ``dataset.json`` (thin CLI over :mod:`trainer.data.shard_writer`).

    python launch/make_shards.py --root data/hymenoptera_data --out data/shards      # root/{train,val}/<class>/
    python launch/make_shards.py --root R --out O --val_fraction 0.2 --test_fraction 0.1   # root/<class>/
    python launch/make_shards.py --manifest '{train: train.csv, val: validation.csv}' --label_map label_map.json --out O
    python launch/make_shards.py --root R --out O --num_workers 8                 # process pool
    python launch/make_shards.py --root R --out O --num_workers 64 --worker_index $SLURM_ARRAY_TASK_ID
    python launch/make_shards.py --root R --out O --num_workers 64 --merge         # redo the merge

The source options are the ``data.*`` fields of the trainer (``trainer/config/sections/data.py``), listed the
same way (``trainer.data.prepare.build_listing``), so the shards are the ones a run would write.
Unreadable files are listed in a warning and never written (``--strict``: an error). Leaks (the same
image in two splits, a path listed twice) are recorded in ``dataset.json`` and, with ``--on_leak
error`` (default), end this command with status 2 after writing. Bad input: one line, status 2
(``trainer.cli.errors``); ``finetune-shards`` is the same command as a console script.
"""

from __future__ import annotations

import logging
from typing import Literal

from trainer.cli.errors import run_cli
from trainer.config.schema import ConfigError, DataConfig
from trainer.data.prepare import build_listing
from trainer.data.shard_writer import leak_message, merge_partial_metadata, write_listing


def main(root: str | None = None, out: str | None = None, manifest: str | dict | None = None,
         path_column: int | str | None = None, label_column: int | str | None = None,
         split_column: int | str | None = None, label_map: str | None = None, val_fraction: float | None = None,
         test_fraction: float = 0.0, split_seed: int = 0, on_leak: Literal["error", "warn"] = "error",
         task: Literal["multiclass", "multilabel"] = "multiclass", label_delimiter: str = "|",
         label_columns: str | None = None,
         max_samples_per_shard: int = 1000, max_bytes_per_shard: float = 1e9, num_workers: int = 1,
         worker_index: int | None = None, strict: bool = False, overwrite: bool = False, merge: bool = False,
         progress: bool = True) -> None:
    """Write shards; prints a one-line summary per split.

    Args:
        root: image folder ``root/{train,val[,test]}/<class>/`` or ``root/<class>/`` (with ``val_fraction``).
        out: output folder for shards and ``dataset.json`` (written atomically).
        manifest: a CSV/JSONL file with a split column, or ``{train: a.csv, val: b.csv[, test: c.csv]}`` (one
            file per split), instead of ``root``.
        path_column: manifest column of the image paths (name or 0-based index; default: found by name).
        label_column: manifest column of the labels (name or 0-based index; default: found by name).
        split_column: manifest column of the split (``train``/``val``/``test``; default: ``split``).
        label_map: JSON file mapping the manifest's labels to class names (as ``data.label_map``).
        val_fraction: fraction of each class of ``root/<class>/`` held out for validation (stratified).
        test_fraction: fraction of each class of ``root/<class>/`` held out for testing (stratified).
        split_seed: seed of the stratified split.
        on_leak: ``error`` (exit 2 after writing when images leak across splits) or ``warn``.
        task: ``multilabel``: label sets from a manifest (as ``data.task``; ``docs/data.md#multi-label``).
        label_delimiter: text between the labels of one cell (as ``data.label_delimiter``).
        label_columns: one 0/1 column per class: comma-separated names or indices, or ``rest`` (as
            ``data.label_columns``).
        max_samples_per_shard: most samples in one shard.
        max_bytes_per_shard: most bytes in one shard.
        num_workers: N writers; without ``--worker_index`` they run here in a process pool.
        worker_index: run only writer k of N (one per process/node).
        strict: unreadable files are an error instead of a warning.
        overwrite: replace a dataset already in ``out``.
        merge: only merge the N writers' partial files and commit.
        progress: show a progress bar.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if out is None:
        raise ConfigError("--out is required")
    if root is None and manifest is None:
        raise ConfigError("--root or --manifest is required")
    cfg = DataConfig(root=root, manifest=manifest, path_column=path_column, label_column=label_column,
                     split_column=split_column, label_map=label_map, val_fraction=val_fraction,
                     test_fraction=test_fraction, split_seed=split_seed, shard_dir=out, task=task,
                     label_delimiter=label_delimiter,
                     label_columns=label_columns if label_columns in (None, "rest") else
                     [c.strip() for c in label_columns.split(",")])
    listing = build_listing(cfg)
    if merge:
        meta = merge_partial_metadata(out, num_workers, listing)
    else:
        meta = write_listing(listing, out, max_samples_per_shard=max_samples_per_shard,
                             max_bytes_per_shard=max_bytes_per_shard, num_workers=num_workers,
                             worker_index=worker_index, strict=strict, overwrite=overwrite, progress=progress)
    for split, m in meta["splits"].items():
        print(f"{split}: {m['num_samples']} samples, {m['num_shards']} shards, {m['num_skipped']} skipped")
    leak = leak_message(meta.get("leaks") or {})
    if leak and on_leak == "error":
        raise ConfigError(f"--on_leak: {leak} (the shards are written; --on_leak warn accepts them)")
    if leak:
        logging.getLogger("make_shards").warning("leak: %s", leak)


def cli() -> None:
    """Console script ``finetune-shards`` (same as ``python launch/make_shards.py``)."""
    run_cli(main, prog="finetune-shards")


if __name__ == "__main__":
    run_cli(main)
