"""A deterministic stratified subset of a split's shards, read by several ranks without overlap.

Selection rule (one pass, memory proportional to the subset): every sample gets the score
``sha256(seed/key)``; class ``c`` keeps its ``q_c`` lowest-scoring samples, where the quotas ``q_c``
split ``size`` over the classes in proportion to the class counts of ``dataset.json`` (largest
remainder, at least one per non-empty class). The subset depends only on the data, ``size`` and
``seed``: not on the number of ranks, shard order or read order.

With several ranks each reads only its part of the shards (the readers of the trainer's evaluation
stream, :class:`trainer.data.stream.EvalStream`: every sample read by exactly one rank), keeps its
per-class candidates, and the ranks exchange only ``(score, class)`` pairs (one ``gather_object``) to
find each class's global cut-off. Each rank then holds exactly the selected samples of its shards.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trainer.data.stream import EvalStream, WorkerState, error_reason


def stratified_quotas(class_counts: Sequence[int], size: int) -> list[int]:
    """Samples per class for a subset of ``size`` of a split with these class counts.

    Proportional, largest remainder, at least 1 for every class with samples (when ``size`` allows),
    never more than the class has. ``size >= sum(class_counts)`` gives the whole split.

    Raises:
        ValueError: ``size < 1``.
    """
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    total = sum(class_counts)
    if size >= total:
        return list(class_counts)
    raw = [size * n / total for n in class_counts]
    q = [min(n, max(1 if n else 0, int(r))) for n, r in zip(class_counts, raw)]
    order = sorted(range(len(q)), key=lambda c: (raw[c] - int(raw[c]), class_counts[c]), reverse=True)
    while sum(q) < size:
        grew = False
        for c in order:
            if sum(q) >= size:
                break
            if q[c] < class_counts[c]:
                q[c] += 1
                grew = True
        if not grew:
            break
    while sum(q) > size:  # the minimum of 1 per class overshot: take from the largest quotas
        c = max(range(len(q)), key=lambda i: q[i])
        q[c] -= 1
    return q


def _score(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()


@dataclass
class SubsetSample:
    """One selected sample: ``key`` (``__key__``), ``label`` (the ``cls`` integer; multi-label: the sorted
    class indices of its label set, :mod:`trainer.selection.multilabel`), the raw WebDataset sample and its shard."""

    key: str
    label: int | tuple[int, ...]
    raw: dict
    url: str


def read_subset(shards: list[str], class_counts: Sequence[int], size: int, *, seed: int, rank: int,
                world_size: int, gather_object: Callable[[list], list] | None = None
                ) -> tuple[list[SubsetSample], list[str]]:
    """This rank's selected samples of a stratified subset of ``shards`` (see the module docstring).

    Args:
        shards: the split's shard list (the same on every rank).
        class_counts: the split's per-class counts from ``dataset.json`` (label order).
        size: subset size over all ranks (the whole split if larger).
        seed: selection seed.
        rank, world_size: this process and the number of processes.
        gather_object: ``accelerate.utils.gather_object`` (list -> concatenated list of all ranks);
            needed when ``world_size > 1``; called exactly once.

    Returns:
        ``(samples, skipped)``: this rank's selected samples sorted by key, and reports
        ``"shard:key: reason"`` of samples without a usable label (never selected).
    """
    quotas = stratified_quotas(class_counts, size)
    reader = EvalStream(shards, rank=rank, world_size=world_size, micro_batch_size=1, transform=None,
                        bad_samples="skip", num_classes=len(class_counts), num_workers=0)
    state = WorkerState()
    heaps: list[list] = [[] for _ in quotas]  # per class: max-heap (negated score) of the q lowest
    tie = itertools.count()  # duplicate keys never compare the samples
    for url, sample in reader._raw(rank, state):
        key = str(sample.get("__key__", "?"))
        try:
            raw = sample.get("cls")
            label = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            state.skipped.append(f"{url}:{key}: no usable 'cls' label ({error_reason(e)})")
            continue
        if not 0 <= label < len(quotas):
            state.skipped.append(f"{url}:{key}: label {label} outside [0, {len(quotas)})")
            continue
        if quotas[label] == 0:
            continue
        item = (_neg(_score(seed, key)), key, next(tie), SubsetSample(key, label, sample, url))
        heap = heaps[label]
        if len(heap) < quotas[label]:
            heapq.heappush(heap, item)
        elif item[:3] > heap[0][:3]:
            heapq.heapreplace(heap, item)
    mine = [(_pos(neg), key, s) for heap in heaps for neg, key, _, s in heap]
    if world_size > 1:
        if gather_object is None:
            raise ValueError("read_subset: world_size > 1 needs gather_object")
        pairs = gather_object([(score, key, s.label) for score, key, s in mine])
        cut: dict[int, tuple[str, str]] = {}
        for c in range(len(quotas)):
            ranked = sorted((score, key) for score, key, label in pairs if label == c)
            if ranked and quotas[c]:
                cut[c] = ranked[min(quotas[c], len(ranked)) - 1]
        mine = [m for m in mine if m[2].label in cut and (m[0], m[1]) <= cut[m[2].label]]
    return sorted((s for _, _, s in mine), key=lambda s: s.key), state.skipped


def _neg(hexdigest: str) -> str:
    """Order-reversing map of a hex digest (for a max-heap over strings)."""
    return hexdigest.translate(_REV)


def _pos(neg: str) -> str:
    return neg.translate(_REV)


_REV = str.maketrans("0123456789abcdef", "fedcba9876543210")


def data_fingerprint(meta_path: str, train_shards: Sequence[str], val_shards: Sequence[str]) -> str:
    """SHA-256 (hex) over ``dataset.json``'s bytes and every shard's name, size and mtime (local
    shards; a remote URL counts by name only). Changes whenever a shard is rewritten."""
    h = hashlib.sha256()
    with open(meta_path, "rb") as f:
        h.update(f.read())
    for split, shards in (("train", train_shards), ("val", val_shards)):
        for url in shards:
            st = os.stat(url) if os.path.isfile(url) else None
            h.update(json.dumps([split, url, st.st_size if st else None,
                                 st.st_mtime_ns if st else None]).encode())
    return h.hexdigest()
