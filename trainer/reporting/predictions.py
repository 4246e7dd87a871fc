"""The best model's validation predictions: per-sample collector (gathered across ranks), CSV, mistakes grid."""

from __future__ import annotations

import csv
import heapq
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from trainer.reporting.plots import DPI, _save, _short
from trainer.utils.files import atomic_write

# ---------------------------------------------------------------------------------------------
# predictions and mistakes


@dataclass
class Mistake:
    """One wrong val prediction. ``image`` is ``(3, H, W) uint8`` as fed to the model (before normalisation)."""

    prob: float
    key: str
    true: int
    pred: int
    true_prob: float
    image: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Predictions:
    """Softmax outputs of every val sample (on the main process, after :meth:`PredictionCollector.gather`).

    Attributes:
        keys: N sample keys (``val/ants/123``), sorted.
        labels: ``(N,) int64`` true labels.
        probs: ``(N, C) float32`` class probabilities.
        mistakes: the most confident mistakes with images, most confident first.
    """

    keys: list[str]
    labels: np.ndarray
    probs: np.ndarray
    mistakes: list[Mistake]

    @property
    def preds(self) -> np.ndarray:
        """``(N,) int64`` predicted labels (argmax)."""
        return self.probs.argmax(axis=1) if len(self.keys) else np.zeros(0, dtype=np.int64)

    def all_mistakes(self) -> list[tuple[str, int, int, float, float]]:
        """Every wrong prediction as ``(key, true, pred, prob of pred, prob of true)``, most confident first."""
        preds = self.preds
        wrong = np.nonzero(preds != self.labels)[0]
        rows = [(self.keys[i], int(self.labels[i]), int(preds[i]), float(self.probs[i, preds[i]]),
                 float(self.probs[i, self.labels[i]])) for i in wrong]
        rows.sort(key=lambda r: (-r[3], r[0]))
        return rows


class PredictionCollector:
    """``on_batch`` callback of :func:`trainer.train.loop.evaluate` that records this rank's predictions.

    Keeps, per sample, the key, true label and softmax probabilities, and the ``num_mistakes`` most
    confident wrong predictions with their images (a bounded heap, so memory does not grow with the
    images of the val set). :meth:`gather` combines every rank's share on the main process.

    Args:
        num_mistakes: how many mistakes (with images) to keep for the grid.
    """

    def __init__(self, num_mistakes: int = 16):
        self.num_mistakes = num_mistakes
        self.keys: list[str] = []
        self.labels: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        # min-heap of (prob, _neg(key), Mistake): the first entry is the one to drop next (least confident,
        # then largest key), so the kept set is the top by (-prob, key) whatever the split over ranks
        self._heap: list[tuple[float, tuple, Mistake]] = []

    def __call__(self, batch: dict, logits: torch.Tensor) -> None:
        """Record a batch.

        Args:
            batch: ``{"key": [B str], "label": (B,) int64, "image": (B, 3, H, W) uint8}`` (loader format).
            logits: ``(B, C)`` float32 on CPU.
        """
        probs = logits.float().softmax(dim=1).numpy()
        labels = batch["label"].cpu().numpy().astype(np.int64)
        keys = list(batch["key"])
        if len(keys) != len(labels) or probs.shape[0] != len(labels):
            raise ValueError(f"PredictionCollector: {len(keys)} keys, {len(labels)} labels, {probs.shape[0]} logits")
        self.keys += keys
        self.labels.append(labels)
        self.probs.append(probs.astype(np.float32))
        preds = probs.argmax(axis=1)
        for i in np.nonzero(preds != labels)[0]:
            m = Mistake(prob=float(probs[i, preds[i]]), key=keys[i], true=int(labels[i]), pred=int(preds[i]),
                        true_prob=float(probs[i, labels[i]]))
            entry = (m.prob, _neg(m.key), m)
            if len(self._heap) < self.num_mistakes:
                m.image = batch["image"][i].cpu().numpy().copy()
                heapq.heappush(self._heap, entry)
            elif self.num_mistakes and entry[:2] > self._heap[0][:2]:
                m.image = batch["image"][i].cpu().numpy().copy()
                heapq.heapreplace(self._heap, entry)

    def local(self) -> dict:
        """This rank's share as a picklable dict."""
        return {"keys": self.keys,
                "labels": np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int64),
                "probs": np.concatenate(self.probs) if self.probs else None,
                "mistakes": [e[2] for e in self._heap]}

    def gather(self, accelerator=None) -> Predictions | None:
        """Combine every rank's predictions (a collective: every rank must call it).

        Uses ``accelerate.utils.gather_object`` (``all_gather_object`` under DDP). Every val sample is
        read by exactly one rank (``trainer.data.loader.EvalLoader``), so each key appears once.

        Returns:
            :class:`Predictions` sorted by key on the main process; None on other ranks.

        Raises:
            RuntimeError: a key appears more than once (the loader's exactly-once guarantee broke).
        """
        parts = [self.local()]
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            parts = gather_object(parts)
            if not accelerator.is_main_process:
                return None
        keys = [k for p in parts for k in p["keys"]]
        labels = np.concatenate([p["labels"] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        probs_parts = [p["probs"] for p in parts if p["probs"] is not None]
        probs = np.concatenate(probs_parts) if probs_parts else np.zeros((0, 0), dtype=np.float32)
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise RuntimeError(f"val predictions: {len(keys) - len(set(keys))} duplicate key(s), e.g. {dup}")
        order = sorted(range(len(keys)), key=keys.__getitem__)
        mistakes = sorted((m for p in parts for m in p["mistakes"]), key=lambda m: (-m.prob, m.key))
        return Predictions(keys=[keys[i] for i in order], labels=labels[order], probs=probs[order],
                           mistakes=mistakes[: self.num_mistakes])


def _neg(key: str):
    """Sort helper: among equal probabilities keep the smaller key (deterministic across rank splits)."""
    return tuple(-ord(ch) for ch in key)


def write_predictions_csv(pred: Predictions, class_names: Sequence[str], path: str | Path) -> Path:
    """Write every val prediction: ``key, true, pred, prob, p_<class>...`` (probabilities with 6 decimals).

    Args:
        pred: gathered predictions (N rows in key order).
        class_names: C names; the columns ``p_<name>`` follow label order.
        path: CSV to write (atomically: temp file + rename).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preds = pred.preds
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["key", "true", "pred", "prob"] + [f"p_{c}" for c in class_names])
    for i, key in enumerate(pred.keys):
        p = pred.probs[i]
        w.writerow([key, class_names[pred.labels[i]], class_names[preds[i]], f"{p[preds[i]]:.6f}"]
                   + [f"{v:.6f}" for v in p])
    return atomic_write(path, buf.getvalue())


def plot_mistakes(mistakes: Sequence[Mistake], class_names: Sequence[str], path: str | Path, *,
                  num_wrong: int | None = None, num_samples: int | None = None, title: str = "",
                  cols: int = 4) -> Path:
    """Write a grid of mistakes (image, true label, predicted label, its probability) as a PNG.

    Args:
        mistakes: most confident first; ``image`` ``(3, H, W) uint8``.
        class_names: C names.
        num_wrong, num_samples: totals for the title ("16 of 23 mistakes on 153 val samples").
        cols: images per row.

    Returns:
        ``path`` (a figure saying "no mistakes" when there are none).
    """
    n = len(mistakes)
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.0 * min(max(n, 1), cols) + 0.2, 3.4 * rows + 0.7), dpi=DPI, layout="constrained")
    head = (title + "\n") if title else ""
    total = f"{num_wrong} " if num_wrong is not None else ""
    on = f" on {num_samples} val samples" if num_samples is not None else ""
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no mistakes{on}", ha="center", va="center", fontsize=14)
    for i, m in enumerate(mistakes):
        ax = fig.add_subplot(rows, min(n, cols), i + 1)
        if m.image is not None:
            ax.imshow(np.ascontiguousarray(np.transpose(m.image, (1, 2, 0))))
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_edgecolor("tab:red")
            s.set_linewidth(2)
        ax.set_title(f"true: {_short(class_names[m.true])} (p={m.true_prob:.2f})\n"
                     f"pred: {_short(class_names[m.pred])} (p={m.prob:.2f})", fontsize=9)
        ax.set_xlabel(_short(m.key, 40), fontsize=7)
    fig.suptitle(f"{head}Most confident mistakes: {n} of {total}mistakes{on}", fontsize=11)
    return _save(fig, path)




