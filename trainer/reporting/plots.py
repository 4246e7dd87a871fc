"""Reports to look at and ship: plots, error analysis and the best model's validation predictions.

Everything lands in ``<output_dir>/reports/`` (main process only) and, as images and a table, in the
run's W&B run (through :class:`trainer.reporting.tracking.Tracker`, the only module that touches W&B):

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
                                prob, true_prob``, the top-5 classes and their probabilities.
``val_per_class.csv``           per class: support, predicted, correct, precision, recall, F1.
``val_confused_pairs.csv``      every non-zero off-diagonal cell of the confusion matrix
                                (true, pred, count), most frequent first.
``latest/val_*.csv``            the two tables above for the most recent evaluation.
``training_curves.png``         train loss, val loss, val top-1 (and balanced accuracy) and the lr
                                of every param group over optimizer steps, from metrics.jsonl.
==============================  ==============================================================

When: all but ``latest/`` and the curves describe the model in ``checkpoints/best/``. Each evaluation collects
this rank's predictions (cheap: top-5 classes per sample and the few most confident mistakes with
their images) and writes ``latest/``; only when the monitored metric improves (``checkpoints/best/`` is
written, see :mod:`trainer.train.early_stopping`) are the predictions gathered to the main process
(``accelerate.utils.gather_object``) and the files rewritten, so no extra validation pass is needed
and the files always match ``checkpoints/best/``, also after a crash. The training curves are drawn when the
run ends (also on preemption or early stopping); ``python -m trainer.reporting.reporter <output_dir>``
redraws them from ``metrics.jsonl`` at any time. Nothing here grows with ``C x C``: the confusion
matrix is sparse (``trainer.reporting.metrics``), and ``metrics.jsonl`` holds scalars only.

Plots use matplotlib's object-oriented API with the Agg canvas (``matplotlib.figure.Figure``; no
pyplot global state, no display needed) and are sized to be readable at 100 dpi with up to 100 classes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from trainer.files.atomic import atomic_write

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


def shorten(name: str, n: int = 24) -> str:
    """``name`` cut to at most ``n`` characters (an ellipsis as the last one), for axis labels."""
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (``DPI``, tight bounding box, white background) to ``path`` atomically
    (:func:`trainer.files.atomic.atomic_write`; the folder is created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight",
                                                      facecolor="white"))


# ---------------------------------------------------------------------------------------------
# confusion matrix, per-class accuracy


def image_grid(n: int, cols: int, cell: tuple[float, float], title_h: float, empty: str) -> tuple[Figure, list]:
    """A figure of ``n`` image axes in rows of ``cols`` (``cell``: width, height in inches per image; ``title_h``:
    inches for the title), or with ``n == 0`` one blank axis saying ``empty``. Returns ``(figure, the n axes)``."""
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(cell[0] * min(max(n, 1), cols) + 0.2, cell[1] * rows + title_h), dpi=DPI,
                 layout="constrained")
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=14)
    return fig, [fig.add_subplot(rows, min(n, cols), i + 1) for i in range(n)]


def show_image(ax, image: np.ndarray | None, frame: str) -> None:
    """Draw a ``(3, H, W) uint8`` image (nothing when None) on ``ax`` without ticks, framed in colour ``frame``."""
    if image is not None:
        ax.imshow(np.ascontiguousarray(np.transpose(image, (1, 2, 0))))
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(frame)
        s.set_linewidth(2)


def top_confused_pairs(confused, support, k: int = TOP_PAIRS) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal cells of a sparse confusion matrix.

    Args:
        confused: ``(K, 3)`` rows ``(true, pred, count)``, off-diagonal cells (``EvalResult.confused``).
        support: ``(C,)`` samples per true class (``EvalResult.support``).

    Returns:
        ``[(true, pred, count, rate)]`` by count (then rate) descending, ``rate = count / samples of
        true``; only cells with count > 0.
    """
    rows = np.asarray(confused, dtype=np.int64).reshape(-1, 3)
    support = np.asarray(support, dtype=np.int64)
    pairs = [(int(t), int(p), int(n), float(n / support[t])) for t, p, n in rows if n > 0 and t != p]
    pairs.sort(key=lambda x: (-x[2], -x[3], x[0], x[1]))
    return pairs[:k]


def plot_confusion_matrix(confusion, class_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Write the confusion matrix normalised per true class as a PNG (up to :data:`MAX_MATRIX_CLASSES` classes;
    above, :func:`plot_confused_pairs` draws the most confused pairs from the sparse cells).

    Args:
        confusion: ``(C, C)`` integer counts, rows = true class, columns = predicted class
            (``EvalResult.confusion_dense()``).
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
        off = cm.copy()
        np.fill_diagonal(off, 0)
        t, p = np.nonzero(off)
        return plot_confused_pairs(np.stack([t, p, off[t, p]], axis=1), cm.sum(axis=1), class_names, path,
                                   title=f"{head}{c} classes, {n} val samples, top-1 {top1:.3f}")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = float(np.clip(2.8 + 0.17 * c, 5.0, 20.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of the true class")
    fs = 10 if c <= 20 else (8 if c <= 50 else 7)
    names = [shorten(s) for s in class_names]
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
    return save_png(fig, path)


def plot_confused_pairs(confused, support, class_names: Sequence[str], path: str | Path, *, title: str) -> Path:
    """Write the :data:`TOP_PAIRS` most confused (true -> predicted) pairs as a bar chart PNG.

    Args:
        confused, support: as in :func:`top_confused_pairs` (sparse: any number of classes).
        class_names: C names.
        path: PNG to write.
        title: title lines above the chart.

    Returns:
        ``path``.
    """
    pairs = top_confused_pairs(confused, support)
    fig = Figure(figsize=(10, max(3.0, 0.3 * len(pairs) + 1.5)), dpi=DPI)
    ax = fig.add_subplot()
    if pairs:
        labels = [f"{shorten(class_names[t], 30)} \u2192 {shorten(class_names[p], 30)}" for t, p, _, _ in pairs]
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
    return save_png(fig, path)


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
    ax.set_yticks(y, labels=[shorten(class_names[i], 30) for i in shown], fontsize=fs)
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
    return save_png(fig, path)


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
    """Write train/val loss, val top-1 (multi-label runs: val mAP, micro F1 and exact-set accuracy) and the lr of
    every param group over optimizer steps as a PNG.

    Args:
        metrics_path: the run's ``metrics.jsonl`` (keys ``train/loss``, ``val/loss``, ``val/top1``,
            ``val/balanced_acc`` or ``val/mAP``, ``val/f1_micro``, ``val/exact_set_accuracy``, ``lr/<group>``).
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
    multilabel = "val/mAP" in m  # a multi-label run: sigmoid per class, monitored by mAP
    val_loss = "val loss (binary cross-entropy)" if multilabel else "val loss (cross-entropy)"
    any_loss |= line(ax_loss, "val/loss", val_loss, color="tab:orange", marker="o", ms=4)
    ax_loss.set_title("Loss")
    ax_loss.set_ylabel("loss per sample")
    if multilabel:
        any_acc = line(ax_acc, "val/mAP", "val mAP", color="tab:green", marker="o", ms=4)
        any_acc |= line(ax_acc, "val/f1_micro", "val micro F1", color="tab:purple", marker="s", ms=3, ls="--")
        any_acc |= line(ax_acc, "val/exact_set_accuracy", "val exact-set accuracy", color="tab:red", marker="^",
                        ms=3, ls=":")
    else:
        any_acc = line(ax_acc, "val/top1", "val top-1", color="tab:green", marker="o", ms=4)
        any_acc |= line(ax_acc, "val/balanced_acc", "val balanced accuracy", color="tab:purple", marker="s", ms=3,
                        ls="--")
    key = "val/mAP" if multilabel else "val/top1"
    if key in m:
        steps, vals = m[key]
        best = int(np.argmax(vals))
        ax_acc.plot([steps[best]], [vals[best]], marker="*", ms=13, color="gold", mec="k", ls="none",
                    label=f"highest {key.removeprefix('val/')} {vals[best]:.3f} (step {steps[best]})")
    ax_acc.set_title("Validation mAP, F1 and exact-set accuracy" if multilabel else "Validation accuracy")
    ax_acc.set_ylabel("score" if multilabel else "accuracy")
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
    return save_png(fig, path)


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




