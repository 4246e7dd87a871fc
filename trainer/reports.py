"""Reports to look at and ship: plots, error analysis and the best model's validation predictions.

Everything lands in ``<output_dir>/reports/`` (main process only) and, as images and a table, in the
run's W&B run (through :class:`trainer.tracking.Tracker`, the only module that touches W&B):

==============================  ==============================================================
``confusion_matrix.png``        confusion matrix normalised per true class (rows sum to 1), with
                                class names; with more than 100 classes the 30 most confused
                                (true -> predicted) pairs instead.
``per_class_accuracy.png``      accuracy (recall) of every class, worst first, with its sample
                                count; with more than 100 classes the 50 worst.
``mistakes.png``                the most confident mistakes on val: image (as the model saw it,
                                after the eval resize + centre crop), true label, predicted
                                label and its probability.
``val_predictions.csv``         every val sample exactly once, sorted by key: ``key, true, pred,
                                prob`` (of pred) and ``p_<class>`` for every class.
``training_curves.png``         train loss, val loss, val top-1 (and balanced accuracy) and the lr
                                of every param group over optimizer steps, from metrics.jsonl.
==============================  ==============================================================

When: the first four describe the model in ``best.pt``. Each evaluation collects this rank's
predictions (cheap: softmax outputs and the few most confident mistakes with their images); only when
the monitored metric improves (``best.pt`` is written, see :mod:`trainer.early_stopping`) are they
gathered to the main process (``accelerate.utils.gather_object``) and the files rewritten, so no
extra validation pass is needed and the files always match ``best.pt``, also after a crash. The
training curves are drawn when the run ends (also on preemption or early stopping);
``python -m trainer.reports <output_dir>`` redraws them from ``metrics.jsonl`` at any time.

Plots use matplotlib's object-oriented API with the Agg canvas (``matplotlib.figure.Figure``; no
pyplot global state, no display needed) and are sized to be readable at 100 dpi with up to 100 classes.
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

log = logging.getLogger("trainer")

MAX_MATRIX_CLASSES = 100
"""Above this many classes the confusion matrix becomes a list of the most confused pairs."""
TOP_PAIRS = 30
"""Confused pairs shown for more than :data:`MAX_MATRIX_CLASSES` classes."""
WORST_CLASSES = 50
"""Classes shown in the per-class plot for more than :data:`MAX_MATRIX_CLASSES` classes."""
DPI = 100

FILES = {"confusion": "confusion_matrix.png", "per_class": "per_class_accuracy.png",
         "mistakes": "mistakes.png", "predictions": "val_predictions.csv", "curves": "training_curves.png"}


def reports_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/reports``."""
    return Path(output_dir) / "reports"


def _short(name: str, n: int = 24) -> str:
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight", facecolor="white")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# confusion matrix, per-class accuracy


def top_confused_pairs(confusion, k: int = TOP_PAIRS) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix.

    Args:
        confusion: ``(C, C)`` counts, rows = true class, columns = predicted class.

    Returns:
        ``[(true, pred, count, rate)]`` by count (then rate) descending, ``rate = count / samples of
        true``; only cells with count > 0.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    rows = cm.sum(axis=1)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    idx = np.argwhere(off > 0)
    pairs = [(int(t), int(p), int(off[t, p]), float(off[t, p] / rows[t])) for t, p in idx]
    pairs.sort(key=lambda x: (-x[2], -x[3], x[0], x[1]))
    return pairs[:k]


def plot_confusion_matrix(confusion, class_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Write the confusion matrix normalised per true class as a PNG (top-confused pairs above 100 classes).

    Args:
        confusion: ``(C, C)`` integer counts, rows = true class, columns = predicted class
            (``EvalResult.confusion``).
        class_names: C names in label order.
        path: PNG file to write (parent folders are created).
        title: first title line (e.g. which model / step).

    Returns:
        ``path``.

    Raises:
        ValueError: the matrix is not ``(C, C)`` with ``C = len(class_names)``.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"plot_confusion_matrix: confusion has shape {cm.shape}, expected ({c}, {c})")
    n = int(cm.sum())
    top1 = float(np.trace(cm) / n) if n else float("nan")
    head = (title + "\n") if title else ""
    if c > MAX_MATRIX_CLASSES:
        return _plot_confused_pairs(cm, class_names, path, title=f"{head}{c} classes, {n} val samples, "
                                                                   f"top-1 {top1:.3f}")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = float(np.clip(2.8 + 0.17 * c, 5.0, 20.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of the true class")
    fs = 10 if c <= 20 else (8 if c <= 50 else 7)
    names = [_short(s) for s in class_names]
    ax.set_xticks(range(c), labels=names, rotation=45 if c <= 10 else 90, ha="right" if c <= 10 else "center",
                  rotation_mode="anchor" if c <= 10 else "default", fontsize=fs)
    ax.set_yticks(range(c), labels=[f"{s} ({int(r)})" for s, r in zip(names, rows[:, 0])], fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (val samples)")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if cm[i, j] == 0 and i != j:
                    continue
                v = norm[i, j]
                ax.text(j, i, f"{v:.2f}\n{cm[i, j]}", ha="center", va="center", fontsize=9 if c <= 10 else 7,
                        color="white" if v > 0.5 else "black")
    ax.set_title(f"{head}Confusion matrix, normalised per true class\n{n} val samples, top-1 {top1:.3f}",
                 fontsize=11)
    return _save(fig, path)


def _plot_confused_pairs(cm: np.ndarray, class_names: Sequence[str], path, *, title: str) -> Path:
    pairs = top_confused_pairs(cm)
    fig = Figure(figsize=(10, max(3.0, 0.3 * len(pairs) + 1.5)), dpi=DPI)
    ax = fig.add_subplot()
    if pairs:
        labels = [f"{_short(class_names[t], 30)} \u2192 {_short(class_names[p], 30)}" for t, p, _, _ in pairs]
        counts = [n for _, _, n, _ in pairs]
        y = np.arange(len(pairs))
        ax.barh(y, counts, color="tab:red")
        ax.set_yticks(y, labels=labels, fontsize=8)
        ax.invert_yaxis()
        for yi, (_, _, n, rate) in zip(y, pairs):
            ax.text(n, yi, f" {n} ({rate:.0%} of true class)", va="center", fontsize=7)
        ax.set_xlim(0, max(counts) * 1.35)
    else:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("val samples of the true class predicted as the other")
    ax.set_ylabel("true class \u2192 predicted class")
    ax.set_title(f"{title}\n{len(pairs)} most confused pairs (matrix too large to draw)", fontsize=11)
    return _save(fig, path)


def plot_per_class_accuracy(per_class: Sequence[float], class_names: Sequence[str], path: str | Path, *,
                            class_counts: Sequence[int] | None = None, title: str = "") -> Path:
    """Write a bar chart of each class's val accuracy (recall), worst first, as a PNG.

    Args:
        per_class: C accuracies in [0, 1], NaN for a class without val samples (``EvalResult.per_class``).
        class_names: C names.
        path: PNG to write.
        class_counts: val samples per class (shown next to the bars), e.g. the confusion row sums.
        title: first title line.

    Returns:
        ``path``. With more than 100 classes only the 50 worst are drawn (the title says so).

    Raises:
        ValueError: lengths differ.
    """
    acc = np.asarray(per_class, dtype=np.float64)
    c = len(class_names)
    if acc.shape != (c,) or (class_counts is not None and len(class_counts) != c):
        raise ValueError(f"plot_per_class_accuracy: {acc.shape[0]} accuracies / "
                         f"{len(class_counts) if class_counts is not None else '-'} counts for {c} classes")
    present = ~np.isnan(acc)
    order = [i for i in np.argsort(np.where(present, acc, np.inf), kind="stable") if present[i]]
    shown = order[:WORST_CLASSES] if c > MAX_MATRIX_CLASSES else order
    balanced = float(acc[present].mean()) if present.any() else float("nan")
    k = len(shown)
    fig = Figure(figsize=(9, float(np.clip(1.4 + 0.2 * k, 2.6, 22.0))), dpi=DPI)
    ax = fig.add_subplot()
    y = np.arange(k)
    vals = acc[shown] if k else np.zeros(0)
    colors = ["tab:red" if v < balanced else "tab:blue" for v in vals]
    ax.barh(y, vals, color=colors)
    fs = 10 if k <= 20 else (8 if k <= 50 else 7)
    ax.set_yticks(y, labels=[_short(class_names[i], 30) for i in shown], fontsize=fs)
    ax.invert_yaxis()
    for yi, i in zip(y, shown):
        note = f" {acc[i]:.3f}" + (f" (n={int(class_counts[i])})" if class_counts is not None else "")
        ax.text(min(acc[i], 1.0), yi, note, va="center", fontsize=max(fs - 1, 6))
    ax.axvline(balanced, color="k", ls="--", lw=1)
    ax.set_xlim(0, 1.25)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("accuracy (recall) on val")
    ax.set_ylabel("class, worst first")
    head = (title + "\n") if title else ""
    what = f"the {k} worst of {c} classes" if c > MAX_MATRIX_CLASSES else f"{c} classes"
    ax.set_title(f"{head}Per-class accuracy, {what}\ndashed line: mean over classes (balanced accuracy) "
                 f"{balanced:.3f}; red: below it", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# training curves


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Series of every numeric key in ``metrics.jsonl``.

    A resumed run may log a step twice (the steps after its last checkpoint); the later record wins.

    Returns:
        ``key -> (steps (N,) int64, values (N,) float64)`` sorted by step; null values are dropped.

    Raises:
        FileNotFoundError: no such file.
    """
    series: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            step = rec.get("step")
            if step is None:
                continue
            for k, v in rec.items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                series.setdefault(k, {})[int(step)] = float(v)
    out = {}
    for k, d in series.items():
        steps = np.array(sorted(d), dtype=np.int64)
        out[k] = (steps, np.array([d[s] for s in steps], dtype=np.float64))
    return out


def plot_training_curves(metrics_path: str | Path, path: str | Path, *, title: str = "") -> Path:
    """Write train/val loss, val top-1 and the lr of every param group over optimizer steps as a PNG.

    Args:
        metrics_path: the run's ``metrics.jsonl`` (keys ``train/loss``, ``val/loss``, ``val/top1``,
            ``val/balanced_acc``, ``lr/<group>`` per step).
        path: PNG to write.

    Returns:
        ``path`` (panels without data say so).

    Raises:
        FileNotFoundError: ``metrics_path`` does not exist.
    """
    m = read_metrics(metrics_path)
    fig = Figure(figsize=(16, 4.6), dpi=DPI)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)

    def line(ax, key, label, **kw):
        if key in m:
            steps, vals = m[key]
            ax.plot(steps, vals, label=label, **kw)
            return True
        return False

    any_loss = line(ax_loss, "train/loss", "train loss (training criterion)", color="tab:blue", lw=1.2)
    any_loss |= line(ax_loss, "val/loss", "val loss (cross-entropy)", color="tab:orange", marker="o", ms=4)
    ax_loss.set_title("Loss")
    ax_loss.set_ylabel("loss per sample")
    any_acc = line(ax_acc, "val/top1", "val top-1", color="tab:green", marker="o", ms=4)
    any_acc |= line(ax_acc, "val/balanced_acc", "val balanced accuracy", color="tab:purple", marker="s", ms=3,
                    ls="--")
    if "val/top1" in m:
        steps, vals = m["val/top1"]
        best = int(np.argmax(vals))
        ax_acc.plot([steps[best]], [vals[best]], marker="*", ms=13, color="gold", mec="k", ls="none",
                    label=f"highest top-1 {vals[best]:.3f} (step {steps[best]})")
    ax_acc.set_title("Validation accuracy")
    ax_acc.set_ylabel("accuracy")
    lr_keys = sorted(k for k in m if k.startswith("lr/"))
    lr_sets = _same_series(m, lr_keys)  # groups with identical lr curves share one line
    for i, keys in enumerate(lr_sets):
        names = [k.removeprefix("lr/") for k in keys]
        label = names[0] if len(names) == 1 else (f"all {len(names)} groups" if len(lr_sets) == 1
                                                  else f"{names[0]} + {len(names) - 1} groups, same lr")
        line(ax_lr, keys[0], label, lw=1.2, color=_color(i, len(lr_sets)))
    positive = [v for k in lr_keys for v in m[k][1] if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax_lr.set_yscale("log")
    ax_lr.set_title("Learning rate per param group")
    ax_lr.set_ylabel("lr")
    for ax, has in ((ax_loss, any_loss), (ax_acc, any_acc), (ax_lr, bool(lr_keys))):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if has:
            many = ax is ax_lr and len(lr_sets) > 8
            ax.legend(fontsize=6 if many else 8, ncol=2 if many else 1)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _same_series(m: dict, keys: list[str]) -> list[list[str]]:
    """Partition ``keys`` into lists with identical (steps, values) series, in order of first appearance."""
    sets: list[list[str]] = []
    for k in keys:
        for group in sets:
            s0, v0 = m[group[0]]
            if np.array_equal(s0, m[k][0]) and np.allclose(v0, m[k][1], rtol=1e-9, atol=0):
                group.append(k)
                break
        else:
            sets.append([k])
    return sets


def _color(i: int, n: int):
    from matplotlib import colormaps
    return colormaps["tab10"](i % 10) if n <= 10 else colormaps["viridis"](i / max(n - 1, 1))


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
    """``on_batch`` callback of :func:`trainer.loop.evaluate` that records this rank's predictions.

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
        read by exactly one rank (``trainer.data.EvalLoader``), so each key appears once.

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
    tmp = path.with_name(f".{path.name}.tmp")
    preds = pred.preds
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "true", "pred", "prob"] + [f"p_{c}" for c in class_names])
        for i, key in enumerate(pred.keys):
            p = pred.probs[i]
            w.writerow([key, class_names[pred.labels[i]], class_names[preds[i]], f"{p[preds[i]]:.6f}"]
                       + [f"{v:.6f}" for v in p])
    tmp.replace(path)
    return path


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


# ---------------------------------------------------------------------------------------------
# run glue


class Reporter:
    """What ``trainer/run.py`` calls: collect at each evaluation, write reports for the best model.

    Args:
        output_dir: run directory (reports go to ``output_dir/reports``).
        class_names: C names in label order.
        accelerator: for gathering predictions and knowing the main process.
        tracker: :class:`trainer.tracking.Tracker` (no-op on other ranks).
        num_mistakes: images in the mistakes grid.
        max_table_rows: rows of the W&B mistakes table (most confident first).
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], accelerator, tracker, *,
                 num_mistakes: int = 16, max_table_rows: int = 1000):
        self.dir = reports_dir(output_dir)
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.class_names = list(class_names)
        self.accelerator = accelerator
        self.tracker = tracker
        self.num_mistakes = num_mistakes
        self.max_table_rows = max_table_rows

    def collector(self) -> PredictionCollector:
        """A fresh ``on_batch`` callback for one evaluation."""
        return PredictionCollector(self.num_mistakes)

    def after_eval(self, result, collector: PredictionCollector, *, improved: bool, step: int,
                   epoch: int | None = None) -> None:
        """After an evaluation (every rank calls it). If ``improved`` (``best.pt`` was just written),
        gather the predictions and rewrite confusion matrix, per-class accuracy, mistakes grid and
        predictions CSV, and send them to W&B.

        Args:
            result: the reduced :class:`trainer.metrics.EvalResult` of this evaluation.
        """
        if not improved:
            return
        pred = collector.gather(self.accelerator)
        if pred is None:  # not the main process
            return
        title = f"best model: step {step}" + (f", epoch {epoch}" if epoch is not None else "")
        paths = self.write_best(result, pred, title=title)
        mistakes = pred.all_mistakes()
        self.tracker.log_images({f"reports/{k}": v for k, v in paths.items() if k != "predictions"}, step=step)
        self.tracker.log_table("reports/val_mistakes", ["key", "true", "pred", "prob_pred", "prob_true"],
                               [[k, self.class_names[t], self.class_names[p], pp, pt]
                                for k, t, p, pp, pt in mistakes[: self.max_table_rows]], step=step)

    def write_best(self, result, pred: Predictions, *, title: str = "") -> dict[str, Path]:
        """Write the four best-model reports; returns ``{"confusion"|"per_class"|"mistakes"|"predictions": path}``."""
        cm = np.asarray(result.confusion)
        wrong = int(cm.sum() - np.trace(cm))
        out = {
            "confusion": plot_confusion_matrix(cm, self.class_names, self.dir / FILES["confusion"], title=title),
            "per_class": plot_per_class_accuracy(result.per_class, self.class_names, self.dir / FILES["per_class"],
                                                 class_counts=cm.sum(axis=1).tolist(), title=title),
            "mistakes": plot_mistakes(pred.mistakes, self.class_names, self.dir / FILES["mistakes"],
                                      num_wrong=wrong, num_samples=int(cm.sum()), title=title),
            "predictions": write_predictions_csv(pred, self.class_names, self.dir / FILES["predictions"]),
        }
        log.info("reports for the best model (%s) in %s", title, self.dir)
        return out

    def finish(self, step: int) -> None:
        """At the end of the run (main process): draw the training curves and send them to W&B."""
        if not self.accelerator.is_main_process or not self.metrics_path.is_file():
            return
        path = plot_training_curves(self.metrics_path, self.dir / FILES["curves"])
        self.tracker.log_images({"reports/training_curves": path}, step=step)


def main(output_dir: str) -> None:
    """``python -m trainer.reports <output_dir>``: redraw ``reports/training_curves.png`` from metrics.jsonl."""
    path = plot_training_curves(Path(output_dir) / "metrics.jsonl", reports_dir(output_dir) / FILES["curves"])
    print(path)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
