"""The best model's validation predictions: per-sample top-k collector (gathered across ranks), CSV, mistakes grid."""

from __future__ import annotations

import csv
import heapq
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.reporting.plots import image_grid, save_png, show_image, shorten
from trainer.files.atomic import atomic_write

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
    """Top-k predictions of every val sample (on the main process, after :meth:`PredictionCollector.gather`).

    Per sample only ``k`` classes are kept (``k = min(5, C)``), so memory is ``N x k``, not ``N x C``.

    Attributes:
        keys: N sample keys (``val/ants/123``), sorted.
        labels: ``(N,) int64`` true labels.
        topk: ``(N, k) int64`` the k most probable classes, most probable first.
        topk_probs: ``(N, k) float32`` their softmax probabilities.
        true_probs: ``(N,) float32`` softmax probability of the true class.
        mistakes: the most confident mistakes with images, most confident first.
    """

    keys: list[str]
    labels: np.ndarray
    topk: np.ndarray
    topk_probs: np.ndarray
    true_probs: np.ndarray
    mistakes: list[Mistake]

    @property
    def preds(self) -> np.ndarray:
        """``(N,) int64`` predicted labels (argmax)."""
        return self.topk[:, 0] if len(self.keys) else np.zeros(0, dtype=np.int64)

    def all_mistakes(self) -> list[tuple[str, int, int, float, float]]:
        """Every wrong prediction as ``(key, true, pred, prob of pred, prob of true)``, most confident first."""
        preds = self.preds
        wrong = np.nonzero(preds != self.labels)[0]
        rows = [(self.keys[i], int(self.labels[i]), int(preds[i]), float(self.topk_probs[i, 0]),
                 float(self.true_probs[i])) for i in wrong]
        rows.sort(key=lambda r: (-r[3], r[0]))
        return rows


class PredictionCollector:
    """``on_batch`` callback of :func:`trainer.train.loop.evaluate` that records this rank's predictions.

    Keeps, per sample, the key, true label, the ``topk`` most probable classes with their softmax
    probabilities and the probability of the true class (``N x k``, never ``N x C``), and the
    ``num_mistakes`` most confident wrong predictions with their images (a bounded heap, so memory
    does not grow with the images of the val set). :meth:`gather` combines every rank's share on the
    main process.

    Args:
        num_mistakes: how many mistakes (with images) to keep for the grid.
        topk: classes kept per sample (capped at C).
    """

    def __init__(self, num_mistakes: int = 16, topk: int = 5):
        self.num_mistakes = num_mistakes
        self.k = topk
        self.keys: list[str] = []
        self.labels: list[np.ndarray] = []
        self.topk: list[np.ndarray] = []
        self.topk_probs: list[np.ndarray] = []
        self.true_probs: list[np.ndarray] = []
        # min-heap of (prob, _neg(key), Mistake): the first entry is the one to drop next (least confident,
        # then largest key), so the kept set is the top by (-prob, key) whatever the split over ranks
        self._heap: list[tuple[float, tuple, Mistake]] = []

    def __call__(self, batch: dict, logits: torch.Tensor) -> None:
        """Record a batch.

        Args:
            batch: ``{"key": [B str], "label": (B,) int64, "image": (B, 3, H, W) uint8}`` (loader format).
            logits: ``(B, C)`` float32 on CPU.
        """
        probs = logits.float().softmax(dim=1)
        labels_t = batch["label"].cpu().long()
        keys = list(batch["key"])
        if len(keys) != len(labels_t) or probs.shape[0] != len(labels_t):
            raise ValueError(f"PredictionCollector: {len(keys)} keys, {len(labels_t)} labels, {probs.shape[0]} logits")
        top_p, top_i = probs.topk(min(self.k, probs.shape[1]), dim=1)
        true_p = probs.gather(1, labels_t[:, None])[:, 0].numpy()
        top_p, top_i, labels = top_p.numpy(), top_i.numpy().astype(np.int64), labels_t.numpy()
        self.keys += keys
        self.labels.append(labels)
        self.topk.append(top_i)
        self.topk_probs.append(top_p.astype(np.float32))
        self.true_probs.append(true_p.astype(np.float32))
        for i in np.nonzero(top_i[:, 0] != labels)[0]:
            m = Mistake(prob=float(top_p[i, 0]), key=keys[i], true=int(labels[i]), pred=int(top_i[i, 0]),
                        true_prob=float(true_p[i]))
            entry = (m.prob, _neg(m.key), m)
            if len(self._heap) < self.num_mistakes:
                m.image = batch["image"][i].cpu().numpy().copy()
                heapq.heappush(self._heap, entry)
            elif self.num_mistakes and entry[:2] > self._heap[0][:2]:
                m.image = batch["image"][i].cpu().numpy().copy()
                heapq.heapreplace(self._heap, entry)

    def local(self) -> dict:
        """This rank's share as a picklable dict."""
        def cat(parts, dtype, width=None):
            if parts:
                return np.concatenate(parts)
            return np.zeros((0,) if width is None else (0, width), dtype=dtype)
        return {"keys": self.keys, "labels": cat(self.labels, np.int64),
                "topk": cat(self.topk, np.int64, self.k), "topk_probs": cat(self.topk_probs, np.float32, self.k),
                "true_probs": cat(self.true_probs, np.float32), "mistakes": [e[2] for e in self._heap]}

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
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise RuntimeError(f"val predictions: {len(keys) - len(set(keys))} duplicate key(s), e.g. {dup}")
        nonempty = [p for p in parts if len(p["keys"])] or parts[:1]
        arrays = {name: np.concatenate([p[name] for p in nonempty])
                  for name in ("labels", "topk", "topk_probs", "true_probs")}
        order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
        mistakes = sorted((m for p in parts for m in p["mistakes"]), key=lambda m: (-m.prob, m.key))
        return Predictions(keys=[keys[i] for i in order], **{k: v[order] for k, v in arrays.items()},
                           mistakes=mistakes[: self.num_mistakes])


def _neg(key: str):
    """Sort helper: among equal probabilities keep the smaller key (deterministic across rank splits)."""
    return tuple(-ord(ch) for ch in key)


def write_predictions_csv(pred: Predictions, class_names: Sequence[str], path: str | Path) -> Path:
    """Write every val prediction: ``key, true, pred, prob, true_prob, top1..topK, prob1..probK``.

    The columns follow ``launch/predict.py`` (without its ``p_<class>`` columns: the file stays
    ``N x k`` whatever the number of classes); probabilities with 6 decimals.

    Args:
        pred: gathered predictions (N rows in key order).
        class_names: C names in label order.
        path: CSV to write (atomically: temp file + rename).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = pred.topk.shape[1]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["key", "true", "pred", "prob", "true_prob"] + [f"top{i + 1}" for i in range(k)]
               + [f"prob{i + 1}" for i in range(k)])
    for i, key in enumerate(pred.keys):
        top, p = pred.topk[i], pred.topk_probs[i]
        w.writerow([key, class_names[pred.labels[i]], class_names[top[0]], f"{p[0]:.6f}",
                    f"{pred.true_probs[i]:.6f}"] + [class_names[j] for j in top] + [f"{v:.6f}" for v in p])
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
    head = (title + "\n") if title else ""
    total = f"{num_wrong} " if num_wrong is not None else ""
    on = f" on {num_samples} val samples" if num_samples is not None else ""
    fig, axes = image_grid(n, cols, (3.0, 3.4), 0.7, f"no mistakes{on}")
    for ax, m in zip(axes, mistakes):
        show_image(ax, m.image, "tab:red")
        ax.set_title(f"true: {shorten(class_names[m.true])} (p={m.true_prob:.2f})\n"
                     f"pred: {shorten(class_names[m.pred])} (p={m.prob:.2f})", fontsize=9)
        ax.set_xlabel(shorten(m.key, 40), fontsize=7)
    fig.suptitle(f"{head}Most confident mistakes: {n} of {total}mistakes{on}", fontsize=11)
    return save_png(fig, path)




