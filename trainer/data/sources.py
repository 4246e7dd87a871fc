"""Shard specs (paths, brace patterns, globs, directories, URLs, ``pipe:``) -> shard lists; steps per epoch."""

from __future__ import annotations

import glob
import logging
import math
import os
import re
from collections.abc import Sequence

import braceexpand

log = logging.getLogger(__name__)


_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")



# ----------------------------------------------------------------------------------------------
# shard lists and epoch length


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into a list of shard paths/URLs (order kept; every rank must pass the same).

    Accepted (also mixed in a list): a local file; a brace pattern ``train-{000000..000009}.tar``
    (braceexpand, as WebDataset); a glob ``shards/train-*.tar`` (sorted); a directory (all ``*.tar``
    inside, sorted); ``http(s)://`` or any other ``scheme://`` URL and ``pipe:`` commands (kept as
    they are, read through ``webdataset.gopen``: curl for http, the shell for pipe:).

    Raises:
        FileNotFoundError: a local path of the spec does not exist, or nothing matches (names the spec).
        ValueError: an empty list.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("resolve_shards: empty list of shard specs")
    out: list[str] = []
    for s in specs:
        s = os.fspath(s)
        found, missing = [], []
        for item in braceexpand.braceexpand(s):
            if item.startswith("pipe:") or (_URL_RE.match(item) and not item.startswith("file://")):
                found.append(item)
                continue
            path = os.path.expanduser(item[len("file://"):] if item.startswith("file://") else item)
            if os.path.isdir(path):
                found += sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            elif glob.has_magic(path):
                found += sorted(glob.glob(path))
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(path)
        if missing:
            raise FileNotFoundError(f"resolve_shards: {len(missing)} shard(s) of spec {s!r} not found, e.g. "
                                    f"{missing[:3]}")
        if not found:
            raise FileNotFoundError(f"resolve_shards: no shard matches spec {s!r}")
        out += found
    shown = specs[0] if len(specs) == 1 else f"{os.fspath(specs[0])} ... ({len(specs)} specs)"
    log.info("resolve_shards: %d shard(s) from %s", len(out), shown)
    return out


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps per epoch: ``ceil(num_samples / global_batch_size)``.

    ``num_samples`` comes from ``dataset.json`` (``splits.train.num_samples``); ``global_batch_size =
    micro_batch_size x grad_accum_steps x world_size``. Rounding up means one epoch feeds at least
    ``num_samples`` samples; the last step's surplus comes from the readers starting over on their
    shards. Pass ``steps_per_epoch(...) * grad_accum_steps`` micro-batches to
    :meth:`TrainLoader.epoch`.

    Raises:
        ValueError: ``num_samples`` or ``global_batch_size`` below 1.
    """
    if num_samples < 1 or global_batch_size < 1:
        raise ValueError(f"steps_per_epoch: need num_samples >= 1 and global_batch_size >= 1, got "
                         f"{num_samples} and {global_batch_size}")
    return math.ceil(num_samples / global_batch_size)




