"""Backbone selection on multi-label shards (``dataset.json`` ``"task": "multilabel"``, ``<key>.labels.json``).

**Subset** (:func:`read_subset_multilabel`; one pass, memory proportional to the subset). Every sample gets the
score ``sha256(seed/key)`` of :mod:`trainer.selection.subset`; the per-class quotas ``q_c`` are
:func:`~trainer.selection.subset.stratified_quotas` of the split's ``class_counts`` (for a multi-label split: the
images carrying each class): ``size`` shared in proportion to the counts, at least 1 per class with an image
(when ``size`` is at least the number of such classes).

1. *guaranteed*: for every class ``c``, its ``q_c`` lowest-scoring samples carrying ``c`` (at most ``size``
   samples in all, since the quotas sum to ``size``; fewer when label sets overlap);
2. *fill*: then the lowest-scoring samples not yet taken (any label set, negatives included) up to ``size``.

So every class with an image in the split has positives in the subset (at least its proportional share, at least
one), and the rest is a uniform draw, which keeps the label frequencies in expectation. A simpler rule than the
iterative stratification of :func:`trainer.data.multilabel.iterative_split` (which needs every label set of the
split at once), with the same guarantee that no class is lost. It depends only on the data, ``size`` and ``seed``
(not on the number of ranks, shard order or read order); ``size`` >= the split's size gives the whole split.
With several ranks, each reads its part of the shards and keeps its candidates (per class its ``q_c`` lowest
carriers, and its ``size`` lowest overall); the ranks exchange ``(score, key, label set)`` of the candidates in
one ``gather_object`` and each applies the rule to their union, which holds every sample the rule picks from the
whole split.

**Probe** (:func:`fit_probe_multilabel`): the sigmoid (BCE) L-BFGS probe of
:func:`trainer.finetune.linear_probe.fit_linear_probe_multilabel`, its L2 chosen by the macro mAP
(:func:`trainer.reporting.multilabel.mean_average_precision`) on a held-out part of the training subset drawn by
iterative stratification, then refitted on all of it; candidates are ranked by its mAP on the val subset
(:func:`probe_map`), as the single-label selection ranks by val top-1.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

import torch

from trainer.data.multilabel import iterative_split
from trainer.data.stream import EvalStream, SampleError, WorkerState, sample_label_set
from trainer.finetune.linear_probe import DEFAULT_L2_GRID, ProbeResult, fit_linear_probe_multilabel
from trainer.reporting.multilabel import mean_average_precision
from trainer.selection.subset import SubsetSample, _neg, _pos, _score, stratified_quotas


class _Lowest:
    """The ``k`` lowest-scoring ``(score, key, item)`` offered (a heap of negated scores; k <= 0 keeps none)."""

    def __init__(self, k: int):
        self.k, self.heap, self.tie = k, [], itertools.count()

    def offer(self, score: str, key: str, item) -> None:
        if self.k <= 0:
            return
        entry = (_neg(score), key, next(self.tie), item)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, entry)
        elif entry[:3] > self.heap[0][:3]:
            heapq.heapreplace(self.heap, entry)

    def items(self) -> list[tuple[str, str, object]]:
        return [(_pos(neg), key, item) for neg, key, _, item in self.heap]


def choose_multilabel(candidates: Sequence[tuple[str, str, Sequence[int]]], quotas: Sequence[int],
                      size: int) -> set[tuple[str, str]]:
    """The ``(score, key)`` pairs the rule of the module docstring selects from ``candidates``.

    Args:
        candidates: ``(score, key, label set)`` of the samples to choose from (any order, duplicates allowed).
        quotas: per-class guaranteed positives (``stratified_quotas`` of the class counts).
        size: the subset size.

    Returns:
        the selected ``(score, key)`` pairs: ``min(size, len(candidates))`` of them (distinct pairs).
    """
    ranked = sorted({(score, key, tuple(labels)) for score, key, labels in candidates})
    taken: list[int] = [0] * len(quotas)
    chosen: set[tuple[str, str]] = set()
    for score, key, labels in ranked:  # 1. each class's q_c lowest-scoring carriers
        for c in labels:
            if taken[c] < quotas[c]:
                taken[c] += 1
                chosen.add((score, key))
    for score, key, _ in ranked:  # 2. fill with the lowest-scoring others
        if len(chosen) >= size:
            break
        chosen.add((score, key))
    return chosen


def read_subset_multilabel(shards: list[str], class_counts: Sequence[int], size: int, *, seed: int, rank: int,
                           world_size: int, gather_object: Callable[[list], list] | None = None
                           ) -> tuple[list[SubsetSample], list[str]]:
    """This rank's selected samples of the multi-label subset of ``shards`` (rule: module docstring).

    Args: as :func:`trainer.selection.subset.read_subset`; ``class_counts`` are the images carrying each class
        (``dataset.json``), ``gather_object`` is called exactly once when ``world_size > 1``.

    Returns:
        ``(samples, skipped)``: this rank's selected samples sorted by key (``label``: the sorted class indices
        of the label set), and ``"shard:key: reason"`` of samples without a usable ``labels.json`` (never
        selected).

    Raises:
        ValueError: ``size < 1``; ``world_size > 1`` without ``gather_object``.
    """
    quotas = stratified_quotas(class_counts, size)
    num_classes = len(class_counts)
    reader = EvalStream(shards, rank=rank, world_size=world_size, micro_batch_size=1, transform=None,
                        bad_samples="skip", num_classes=num_classes, multilabel=True, num_workers=0)
    state = WorkerState()
    overall, per_class = _Lowest(size), [_Lowest(q) for q in quotas]
    for url, sample in reader._raw(rank, state):
        key = str(sample.get("__key__", "?"))
        try:
            labels = sample_label_set(sample, num_classes)
        except SampleError as e:
            state.skipped.append(f"{url}:{key}: {e}")
            continue
        score, item = _score(seed, key), SubsetSample(key, labels, sample, url)
        overall.offer(score, key, item)
        for c in labels:
            per_class[c].offer(score, key, item)
    held = {id(s): (score, key, s) for lowest in (overall, *per_class) for score, key, s in lowest.items()}
    candidates = [(score, key, s.label) for score, key, s in held.values()]
    if world_size > 1:
        if gather_object is None:
            raise ValueError("read_subset_multilabel: world_size > 1 needs gather_object")
        candidates = gather_object(candidates)
    chosen = choose_multilabel(candidates, quotas, size)
    return sorted((s for score, key, s in held.values() if (score, key) in chosen), key=lambda s: s.key), \
        state.skipped


def _label_sets(y: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(torch.nonzero(row).flatten().tolist()) for row in y]


def fit_probe_multilabel(x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], *, seed: int = 0,
                         l2_grid: Sequence[float] = DEFAULT_L2_GRID, held_out_fraction: float = 0.2,
                         max_iter: int = 200) -> ProbeResult:
    """Sigmoid probe on the training subset, L2 chosen by the mAP of a held-out part of it, refitted on all rows.

    The held-out part (``held_out_fraction`` of the rows) is drawn by iterative stratification
    (:func:`trainer.data.multilabel.iterative_split` over the rows' keys, seeded by ``seed``; every class keeps a
    row in the fitted part); each lambda of ``l2_grid`` is fitted on the rest
    (:func:`trainer.finetune.linear_probe.fit_linear_probe_multilabel`) and scored by macro mAP
    (:func:`trainer.reporting.multilabel.mean_average_precision`), the winner is refitted on all rows. With no
    held-out row (tiny subsets) the grid is chosen on the training mAP.

    Args:
        x: ``(N, F)`` features; y: ``(N, C)`` 0/1 multi-hot targets; keys: the ``N`` sample keys.

    Returns:
        :class:`~trainer.finetune.linear_probe.ProbeResult` on raw features; ``val_map``, ``val_loss`` and
        ``grid`` are the held-out figures.

    Raises:
        ValueError: mismatched or empty inputs, targets not 0/1, a bad fraction or lambda.
    """
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) != len(keys) or len(x) == 0:
        raise ValueError(f"linear probe: need x (N, F), y (N, C) and N keys with N > 0, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {len(keys)} keys")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"linear probe: held_out_fraction must be in (0, 1), got {held_out_fraction}")
    parts = iterative_split(_label_sets(y), list(keys), {"train": 1.0 - held_out_fraction, "val": held_out_fraction},
                            seed)
    fit = torch.tensor([i for i, p in enumerate(parts) if p == "train"], dtype=torch.int64)
    held = torch.tensor([i for i, p in enumerate(parts) if p == "val"], dtype=torch.int64)
    if len(fit) == 0:
        fit, held = held, held[:0]
    grid = fit_linear_probe_multilabel(x[fit], y[fit], x[held], y[held], l2_grid=l2_grid,
                                       score=mean_average_precision, max_iter=max_iter)
    res = fit_linear_probe_multilabel(x, y, x[:0], y[:0], l2_grid=[grid.l2], score=mean_average_precision,
                                      max_iter=max_iter)
    res.val_map, res.val_loss, res.grid = grid.val_map, grid.val_loss, grid.grid
    res.seconds += grid.seconds
    return res


def probe_map(probe: ProbeResult, x: torch.Tensor, y: torch.Tensor) -> float:
    """Macro mAP of ``probe`` on ``(N, F)`` features with ``(N, C)`` 0/1 targets (NaN: no class has a positive)."""
    return mean_average_precision(probe.logits(x), y)
