"""Image folder -> WebDataset shards + ``dataset.json`` (thin CLI over :func:`trainer.data.shard_writer.write_shards`).

    python launch/make_shards.py --root data/hymenoptera_data --out data/shards
    python launch/make_shards.py --root R --out O --max_samples_per_shard 1000 --splits train,val --strict
    python launch/make_shards.py --root R --out O --num_workers 8                 # process pool
    python launch/make_shards.py --root R --out O --num_workers 64 --worker_index $SLURM_ARRAY_TASK_ID
    python launch/make_shards.py --out O --num_workers 64 --merge                  # redo the merge

Input ``root/{train,val}/<class>/<image>``; output ``out/{split}-000000.tar ...`` (``{split}-wKK-...``
with several writers) and ``out/dataset.json`` (class names in label order, per-split sample and
class counts, shard names). Unreadable files are listed in a warning and never written; ``--strict``
makes them an error. Millions of images: see the docstring of ``trainer/data/shard_writer.py`` (N writers, each
taking every N-th file, as a pool here or one per process/node with ``--worker_index``; the last
writer to finish merges the metadata).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.cli.errors import run_cli  # noqa: E402
from trainer.data.shard_writer import merge_partial_metadata, write_shards  # noqa: E402


def main(root: str | None = None, out: str | None = None, max_samples_per_shard: int = 1000,
         max_bytes_per_shard: float = 1e9, splits: str | tuple = "train,val", num_workers: int = 1,
         worker_index: int | None = None, strict: bool = False, overwrite: bool = False,
         merge: bool = False) -> None:
    """Write shards; prints a one-line summary per split.

    Args:
        root: image folder holding ``train/`` (and the other splits).
        out: output folder for shards and ``dataset.json``.
        max_samples_per_shard, max_bytes_per_shard: shard size limits (samples; bytes).
        splits: comma-separated split folder names (fire may pass a tuple for ``a,b``).
        num_workers: N writers; without ``--worker_index`` they run here in a process pool.
        worker_index: run only writer k of N (one per process/node).
        strict: unreadable files are an error instead of a warning.
        overwrite: replace existing shards in ``out``.
        merge: only merge ``out/dataset.wKK-of-NN.json`` of N writers into ``out/dataset.json``.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if out is None:
        raise SystemExit("make_shards.py: --out is required")
    if merge:
        meta = merge_partial_metadata(out, num_workers)
    else:
        if root is None:
            raise SystemExit("make_shards.py: --root is required")
        if isinstance(splits, (tuple, list)):
            splits = ",".join(map(str, splits))
        meta = write_shards(root, out, splits=splits, max_samples_per_shard=max_samples_per_shard,
                            max_bytes_per_shard=max_bytes_per_shard, num_workers=num_workers,
                            worker_index=worker_index, strict=strict, overwrite=overwrite)
    for split, m in meta["splits"].items():
        print(f"{split}: {m['num_samples']} samples, {m['num_shards']} shards, {m['num_skipped']} skipped")


def cli() -> None:
    """Console script ``finetune-shards`` (same as ``python launch/make_shards.py``)."""
    run_cli(main, prog="finetune-shards")


if __name__ == "__main__":
    run_cli(main)
