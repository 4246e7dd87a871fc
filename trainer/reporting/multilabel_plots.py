"""Multi-label reports (``data.task: multilabel``): per-class AP bars, precision-recall curves of the worst classes,
and a grid of the worst-predicted images with their true and predicted label sets.

Files (``<split>`` = ``val``, ``test``...; written by :meth:`trainer.reporting.reporter.Reporter.write_multilabel`):

============================  =====================================================================================
``<split>_ap_per_class.png``  average precision of every class with positives, worst first, with its support;
                              dashed line: the mAP; with more than 100 classes the 50 worst.
``<split>_pr_curves.png``     precision-recall curves of the :data:`WORST_PR_CLASSES` classes with the lowest AP
                              (and the micro curve of all labels pooled), each with its operating point at the
                              evaluated threshold.
``<split>_mistakes.png``      the worst-predicted images (as the model saw them), captions ``true: a|b`` /
                              ``pred: a|c`` and the number of wrong labels.
``<split>_per_class.csv``     per class: support, AP, F1, precision, recall, threshold, TP, FP, FN — the
                              multi-label confusion (:func:`trainer.reporting.multilabel_eval.write_per_class_csv`).
============================  =====================================================================================

**Precision-recall curves from the histograms** (:func:`pr_curve`): the evaluation keeps per class a histogram of
the sigmoid scores of the positive and of the negative labels over fixed bins
(:mod:`trainer.reporting.multilabel_eval`). Predicting ``p >= BIN_EDGES[k]`` is exactly ``bin >= k``, so the
curve's point at edge ``k`` is ``TP_k / P`` (recall) and ``TP_k / (TP_k + FP_k)`` (precision) with ``TP_k``, ``FP_k``
the positive / negative counts in the bins ``>= k``: exactly the precision and recall of thresholding the
probabilities at that edge, for 1024 thresholds, in memory ``2 x C x 1024`` whatever the number of samples, and
the same for any number of ranks (the histograms are summed exactly).

**The mistakes** (:class:`LabelSetCollector`): each rank keeps the :data:`NUM_MISTAKES` samples with the largest
error in a bounded heap (image ``3 x S x S`` uint8 and ``C`` probabilities each), gathered once on the main
process. The error of a sample is ``(wrong labels, sum_c |y_c - p_c|)`` compared in that order (then the key,
so the choice does not depend on how samples are split over ranks); a validation during training chooses its
thresholds only after the pass, so there the samples are kept by ``sum_c |y_c - p_c|`` alone and the grid
counts their wrong labels at the chosen thresholds.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from trainer.reporting.multilabel_eval import BIN_EDGES, MultiLabelResult
from trainer.reporting.plots import (
    DPI,
    MAX_MATRIX_CLASSES,
    WORST_CLASSES,
    image_grid,
    save_png,
    shorten,
    show_image,
)

NUM_MISTAKES = 16
"""Images in the mistakes grid."""
WORST_PR_CLASSES = 6
"""Classes (lowest AP first) whose precision-recall curves are drawn."""
FILES = {"ap": "ap_per_class.png", "pr": "pr_curves.png", "mistakes": "mistakes.png"}
"""Report files of a split: ``<split>_<name>``."""


# ---------------------------------------------------------------------------------------------
# precision-recall curves from the score histograms


def pr_curve(pos, neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact precision-recall curve of one class (or of pooled labels) from its score histograms.

    Args:
        pos, neg: ``(K,)`` counts of positive / negative labels per score bin, bin ``K - 1`` the highest
            (``MultiLabelResult.pos_hist[c]``, ``neg_hist[c]``; bins as ``BIN_EDGES``).

    Returns:
        ``(recall, precision, thresholds)``, each ``(M,)`` float64, highest threshold first (recall not
        decreasing): one point per bin edge ``k`` at which at least one label is predicted, ``thresholds[i]`` the
        edge ``BIN_EDGES[k]`` (predict ``p >= threshold``; for another number of bins than ``BIN_EDGES``: ``k``).
        Empty arrays for a class without positives.

    Raises:
        ValueError: ``pos`` and ``neg`` differ in shape or are not 1-D.
    """
    p, q = np.asarray(pos, dtype=np.int64), np.asarray(neg, dtype=np.int64)
    if p.ndim != 1 or p.shape != q.shape:
        raise ValueError(f"pr_curve: pos {p.shape} and neg {q.shape} must be the same 1-D shape")
    total = int(p.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty, empty
    tp = np.cumsum(p[::-1])  # edge K-1, K-2, ..., 0: labels in the bins >= k
    pp = np.cumsum((p + q)[::-1])
    edges = (BIN_EDGES.numpy().astype(np.float64) if p.shape[0] == BIN_EDGES.numel()
             else np.arange(p.shape[0], dtype=np.float64))  # another number of bins: the bin index
    keep = pp > 0
    return tp[keep] / total, tp[keep] / pp[keep], edges[::-1][keep]


def worst_classes(result: MultiLabelResult, k: int = WORST_PR_CLASSES) -> list[int]:
    """The ``k`` classes with positives and the lowest AP, lowest first (ties: label order)."""
    ap = np.asarray(result.ap, dtype=np.float64)
    have = [i for i in np.argsort(np.where(np.isnan(ap), np.inf, ap), kind="stable") if not np.isnan(ap[i])]
    return [int(i) for i in have[:k]]


def plot_pr_curves(result: MultiLabelResult, class_names: Sequence[str], path: str | Path, *,
                   k: int = WORST_PR_CLASSES, title: str = "", split: str = "val") -> Path:
    """Write the precision-recall curves of the ``k`` worst classes (lowest AP) and the micro curve as a PNG.

    Each class's operating point (its precision and recall at the evaluated threshold, ``result.precision`` /
    ``recall``) is marked on its curve.

    Args:
        result: a :class:`MultiLabelResult` with ``pos_hist`` / ``neg_hist``.
        class_names: C names. path: PNG to write. title: first title line. split: names the samples.

    Returns:
        ``path`` (a figure saying so when no class has positives).

    Raises:
        ValueError: ``result`` carries no histograms.
    """
    if result.pos_hist is None or result.neg_hist is None:
        raise ValueError("plot_pr_curves: the result carries no score histograms (pos_hist / neg_hist)")
    worst = worst_classes(result, k)
    fig = Figure(figsize=(8.5, 6.5), dpi=DPI)
    ax = fig.add_subplot()
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    for j, c in enumerate(worst):
        r, p, _ = pr_curve(result.pos_hist[c], result.neg_hist[c])
        color = cmap(j % 10)
        ax.step(r, p, where="pre", color=color, lw=1.6,
                label=f"{shorten(class_names[c], 28)}: AP {result.ap[c]:.3f}, n={int(result.support[c])}")
        ax.plot([result.recall[c]], [result.precision[c]], marker="o", ms=7, color=color, mec="k", ls="none")
    mr, mp, _ = pr_curve(result.pos_hist.sum(0), result.neg_hist.sum(0))
    if mr.size:
        ax.step(mr, mp, where="pre", color="0.4", ls="--", lw=1.2,
                label=f"all labels pooled: micro AP {result.map_micro:.3f}")
    if not worst:
        ax.text(0.5, 0.5, f"no class has positive {split} labels", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    if worst or mr.size:
        ax.legend(fontsize=8, loc="lower left")
    head = (title + "\n") if title else ""
    ax.set_title(f"{head}Precision-recall, the {len(worst)} classes with the lowest AP of {len(class_names)} "
                 f"({result.num_samples} {split} samples)\ndots: the operating point at each class's threshold",
                 fontsize=11)
    return save_png(fig, path)


def plot_ap_per_class(result: MultiLabelResult, class_names: Sequence[str], path: str | Path, *, title: str = "",
                      split: str = "val") -> Path:
    """Write a bar chart of each class's average precision, worst first, with its support, as a PNG.

    Classes without positives have no AP and are left out (the title counts them); with more than
    :data:`trainer.reporting.plots.MAX_MATRIX_CLASSES` classes only the :data:`WORST_CLASSES` worst are drawn.

    Returns:
        ``path``.

    Raises:
        ValueError: ``len(class_names)`` is not the result's number of classes.
    """
    c = len(class_names)
    if c != result.num_classes:
        raise ValueError(f"plot_ap_per_class: {c} class names for {result.num_classes} classes")
    order = worst_classes(result, c)
    shown = order[:WORST_CLASSES] if c > MAX_MATRIX_CLASSES else order
    n = len(shown)
    ap = np.asarray(result.ap, dtype=np.float64)
    fig = Figure(figsize=(9, float(np.clip(1.4 + 0.2 * n, 2.6, 22.0))), dpi=DPI)
    ax = fig.add_subplot()
    y = np.arange(n)
    vals = ap[shown] if n else np.zeros(0)
    mean_ap = result.map
    ax.barh(y, vals, color=["tab:red" if v < mean_ap else "tab:blue" for v in vals])
    fs = 10 if n <= 20 else (8 if n <= 50 else 7)
    ax.set_yticks(y, labels=[shorten(class_names[i], 30) for i in shown], fontsize=fs)
    ax.invert_yaxis()
    for yi, i in zip(y, shown):
        ax.text(ap[i], yi, f" {ap[i]:.3f} (n={int(result.support[i])})", va="center", fontsize=max(fs - 1, 6))
    if not math.isnan(mean_ap):
        ax.axvline(mean_ap, color="k", ls="--", lw=1)
    ax.set_xlim(0, 1.25)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel(f"average precision on {split} (n = positive labels)")
    ax.set_ylabel("class, worst first")
    head = (title + "\n") if title else ""
    what = f"the {n} worst of {c} classes" if c > MAX_MATRIX_CLASSES else f"{n} classes"
    missing = c - len(order)
    note = f"; {missing} class(es) without positives left out" if missing else ""
    ax.set_title(f"{head}Per-class AP, {what}{note}\ndashed line: mAP {mean_ap:.3f}; red: below it", fontsize=11)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# the worst-predicted images


@dataclass
class LabelSetMistake:
    """One badly predicted sample: its key, true label set, sigmoid probabilities and image.

    Attributes:
        wrong: labels predicted wrongly at the collector's thresholds (0 when they were not known yet).
        err: ``sum_c |y_c - p_c|`` (the L1 distance between label set and probabilities).
        true: the true label set (class indices, increasing). probs: ``(C,) float32``.
        image: ``(3, H, W) uint8`` as fed to the model.
    """

    wrong: int
    err: float
    key: str
    true: tuple[int, ...]
    probs: np.ndarray = field(repr=False)
    image: np.ndarray | None = field(default=None, repr=False)

    def pred(self, thresholds) -> tuple[int, ...]:
        """The predicted label set at ``(C,)`` thresholds (``p >= threshold``)."""
        return tuple(int(i) for i in np.nonzero(self.probs >= np.asarray(thresholds, dtype=np.float32))[0])

    def num_wrong(self, thresholds) -> int:
        """Labels predicted wrongly at ``thresholds`` (false positives + false negatives)."""
        return len(set(self.true) ^ set(self.pred(thresholds)))


def _rank(wrong: int, err: float, key: str) -> tuple:
    """Heap order: more wrong labels, then larger error, then the smaller key is the worse (kept) one."""
    return (wrong, err, tuple(-ord(ch) for ch in key))


class LabelSetCollector:
    """``on_batch`` callback of :func:`trainer.train.loop.evaluate` (multi-label) keeping the worst predictions.

    A bounded min-heap of the ``num_mistakes`` samples with the largest ``(wrong labels, sum |y - p|)`` (module
    docstring) with their images: memory ``num_mistakes x (3 S^2 + 4 C)`` bytes whatever the number of samples.

    Args:
        num_mistakes: images kept. thresholds: ``(C,)`` thresholds of the evaluation (a checkpoint's), or None
            when they are chosen after the pass (then samples are kept by ``sum |y - p|``).
    """

    def __init__(self, num_mistakes: int = NUM_MISTAKES, thresholds=None):
        self.num_mistakes = int(num_mistakes)
        self.thresholds = None if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32).view(-1)
        self._heap: list[tuple[tuple, int, LabelSetMistake]] = []
        self._seq = 0

    def __call__(self, batch: dict, logits: torch.Tensor) -> None:
        """Record a batch: ``batch`` in the loader's format (``key`` B str, ``label`` ``(B, C)`` 0/1, ``image``
        ``(B, 3, H, W)`` uint8), ``logits`` ``(B, C)`` float32 on CPU.

        Raises:
            ValueError: labels and logits differ in shape.
        """
        if self.num_mistakes <= 0:
            return
        probs = torch.sigmoid(logits.float())
        y = batch["label"].cpu() > 0.5
        if tuple(y.shape) != tuple(probs.shape):
            raise ValueError(f"LabelSetCollector: labels {tuple(y.shape)} and logits {tuple(probs.shape)} differ")
        err = (y.float() - probs).abs().sum(1)
        if self.thresholds is None:
            wrong = torch.zeros(len(err), dtype=torch.int64)
        else:
            wrong = ((probs >= self.thresholds[None, :]) != y).sum(1)
        keys = list(batch["key"])
        candidates = range(len(keys))
        if len(self._heap) >= self.num_mistakes:  # only samples at least as bad as the heap's least bad one
            w0, e0 = self._heap[0][0][:2]
            candidates = torch.nonzero((wrong > w0) | ((wrong == w0) & (err >= e0)))[:, 0].tolist()
        for i in candidates:
            rank = _rank(int(wrong[i]), float(err[i]), keys[i])
            if len(self._heap) >= self.num_mistakes and rank <= self._heap[0][0]:
                continue
            m = LabelSetMistake(wrong=rank[0], err=rank[1], key=keys[i],
                                true=tuple(int(j) for j in torch.nonzero(y[i])[:, 0]),
                                probs=probs[i].numpy().astype(np.float32), image=batch["image"][i].cpu().numpy().copy())
            self._seq += 1
            entry = (rank, self._seq, m)
            if len(self._heap) < self.num_mistakes:
                heapq.heappush(self._heap, entry)
            else:
                heapq.heapreplace(self._heap, entry)

    def gather(self, accelerator=None, thresholds=None) -> list[LabelSetMistake] | None:
        """Combine every rank's kept samples (a collective: every rank must call it; ``gather_object``).

        Args:
            thresholds: ``(C,)`` the evaluation's final thresholds; the returned samples are ordered by their
                wrong labels at these (default: the collector's), then their error, then key.

        Returns:
            the ``num_mistakes`` worst samples of all ranks, worst first, on the main process; None on the others.
        """
        parts = [[e[2] for e in self._heap]]
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            parts = gather_object(parts)
            if not accelerator.is_main_process:
                return None
        kept = sorted((m for p in parts for m in p), key=lambda m: _rank(m.wrong, m.err, m.key),
                      reverse=True)[: self.num_mistakes]
        t = thresholds if thresholds is not None else self.thresholds
        if t is not None:
            for m in kept:
                m.wrong = m.num_wrong(np.asarray(t, dtype=np.float32))
            kept.sort(key=lambda m: _rank(m.wrong, m.err, m.key), reverse=True)
        return kept


def label_set_text(labels: Sequence[int], class_names: Sequence[str], max_names: int = 4, width: int = 13) -> str:
    """``a|b|c +2`` (at most ``max_names`` names, each cut to ``width``), ``(none)`` for the empty set."""
    if not labels:
        return "(none)"
    names = [shorten(class_names[i], width) for i in labels]
    more = f" +{len(names) - max_names}" if len(names) > max_names else ""
    return "|".join(names[:max_names]) + more


def plot_label_set_mistakes(mistakes: Sequence[LabelSetMistake], class_names: Sequence[str], thresholds,
                            path: str | Path, *, num_wrong_sets: int | None = None, num_samples: int | None = None,
                            title: str = "", split: str = "val", cols: int = 4) -> Path:
    """Write a grid of the worst-predicted images with ``true: a|b`` / ``pred: a|c`` captions as a PNG.

    Args:
        mistakes: worst first (:meth:`LabelSetCollector.gather`). thresholds: ``(C,)`` the predicted sets' thresholds.
        num_wrong_sets, num_samples: totals for the title (samples whose predicted set is not the true one).
        cols: images per row.

    Returns:
        ``path``; a red frame marks a wrong label set, a green one a right set (kept for its error only).
    """
    n = len(mistakes)
    t = np.asarray(thresholds, dtype=np.float32)
    fig, axes = image_grid(n, cols, (3.4, 4.2), 0.8, f"no {split} samples")
    for ax, m in zip(axes, mistakes):
        pred = m.pred(t)
        wrong = len(set(m.true) ^ set(pred))
        show_image(ax, m.image, "tab:red" if wrong else "tab:green")
        missed, extra = len(set(m.true) - set(pred)), len(set(pred) - set(m.true))
        ax.set_title(f"true: {label_set_text(m.true, class_names)}\npred: {label_set_text(pred, class_names)}\n"
                     f"{wrong} wrong ({missed} missed, {extra} extra), sum |y-p| {m.err:.2f}", fontsize=8)
        ax.set_xlabel(shorten(m.key, 48), fontsize=7)
    head = (title + "\n") if title else ""
    of = f" of {num_wrong_sets} wrong label sets" if num_wrong_sets is not None else ""
    on = f" on {num_samples} {split} samples" if num_samples is not None else ""
    fig.suptitle(f"{head}Worst-predicted images (most wrong labels, then largest sum |y - p|): {n}{of}{on}",
                 fontsize=11)
    return save_png(fig, path)
