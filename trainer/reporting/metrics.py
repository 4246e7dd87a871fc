"""Classification metrics that are exact across ranks, with memory that does not grow with C x C.

Each rank accumulates additive sums over the samples it saw: the loss sum, top-5 hits and three
per-class counts (``support`` = samples of the class, ``predicted`` = samples predicted as it,
``correct`` = both), ``3 x C`` integers. :meth:`EvalAccumulator.reduce` adds them over ranks with
one ``all_reduce``. The confusion matrix is kept sparse: each rank remembers ``true * C + pred`` of
its samples (8 bytes per val sample, never ``C x C``), counts its off-diagonal cells, and the cells
of all ranks are gathered (``accelerate.utils.gather_object``, one object per rank whose size is
bounded by that rank's mistakes). Because every validation sample is read by exactly one rank (see
``trainer.data.loader.EvalLoader``), the result equals a single-process evaluation, whatever the
number of ranks or the uneven split.

Definitions follow scikit-learn / torchmetrics (``tests/test_metrics.py`` checks against torchmetrics):
balanced accuracy = mean recall over classes with val samples (Brodersen et al. 2010); macro
precision / recall / F1 = mean over classes that occur as true or predicted label, with 0 where a
denominator is 0 (``zero_division=0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EvalResult:
    """Reduced evaluation metrics.

    Attributes:
        loss: mean cross-entropy per sample.
        top1, top5: accuracy in [0, 1] (top5 is None with fewer than 5 classes).
        num_samples: samples evaluated over all ranks.
        support, predicted, correct: ``(C,) int64``: samples whose true class is c, samples predicted
            as c, samples of class c predicted as c (the diagonal of the confusion matrix).
        confused: ``(K, 3) int64`` rows ``(true, pred, count)``: every non-zero off-diagonal cell of
            the confusion matrix (K <= mistakes), by count descending, then true, then pred.
    """

    loss: float
    top1: float
    top5: float | None
    num_samples: int
    support: np.ndarray
    predicted: np.ndarray
    correct: np.ndarray
    confused: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.support.shape[0])

    @property
    def recall(self) -> np.ndarray:
        """``(C,) float64`` per-class recall (= per-class accuracy), NaN where the class has no sample."""
        return _div(self.correct, self.support, empty=np.nan)

    @property
    def precision(self) -> np.ndarray:
        """``(C,) float64`` per-class precision, 0 where nothing was predicted as the class."""
        return _div(self.correct, self.predicted, empty=0.0)

    @property
    def f1(self) -> np.ndarray:
        """``(C,) float64`` per-class F1 = 2 tp / (support + predicted), 0 where both are 0."""
        return _div(2 * self.correct, self.support + self.predicted, empty=0.0)

    @property
    def per_class(self) -> list[float]:
        """Per-class recall as a list (NaN for classes without val samples)."""
        return self.recall.tolist()

    @property
    def balanced_accuracy(self) -> float:
        """Mean per-class recall over the classes present (Brodersen et al. 2010)."""
        present = self.support > 0
        return float(self.recall[present].mean()) if present.any() else float("nan")

    def macro(self) -> dict[str, float]:
        """``{"precision", "recall", "f1"}``: unweighted means over classes seen as true or predicted label."""
        seen = (self.support + self.predicted) > 0
        if not seen.any():
            return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
        recall = _div(self.correct, self.support, empty=0.0)
        return {"precision": float(self.precision[seen].mean()), "recall": float(recall[seen].mean()),
                "f1": float(self.f1[seen].mean())}

    def confusion_dense(self) -> np.ndarray:
        """``(C, C) int64`` confusion matrix, rows = true class, columns = predicted class.

        C x C memory: for drawing small matrices (``trainer.reporting.plots``), not for thousands of classes.
        """
        c = self.num_classes
        cm = np.zeros((c, c), dtype=np.int64)
        cm[np.arange(c), np.arange(c)] = self.correct
        if len(self.confused):
            cm[self.confused[:, 0], self.confused[:, 1]] = self.confused[:, 2]
        return cm

    def as_log(self, prefix: str = "val/") -> dict:
        """Scalars for metrics.jsonl / W&B (size independent of C): loss, top1, top5, balanced accuracy,
        macro precision / recall / F1, num_samples. Per-class tables and the confusion go to ``reports/``."""
        m = self.macro()
        out = {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}balanced_acc": self.balanced_accuracy,
               f"{prefix}macro_precision": m["precision"], f"{prefix}macro_recall": m["recall"],
               f"{prefix}macro_f1": m["f1"], f"{prefix}num_samples": self.num_samples}
        if self.top5 is not None:
            out[f"{prefix}top5"] = self.top5
        return out


def _div(num: np.ndarray, den: np.ndarray, *, empty: float) -> np.ndarray:
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def count_cells(cells: np.ndarray, num_classes: int, counts: np.ndarray | None = None) -> np.ndarray:
    """``(K, 3) int64`` rows ``(true, pred, count)`` of flat confusion cells ``true * C + pred`` (any order, repeats
    allowed: the counts of equal cells are added; ``counts`` default 1 each), sorted by count descending,
    then true, then pred."""
    if cells.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    uniq, inv = np.unique(cells.astype(np.int64), return_inverse=True)
    w = np.ones(len(cells), dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
    counts = np.bincount(inv.reshape(-1), weights=w, minlength=len(uniq)).round().astype(np.int64)
    rows = np.stack([uniq // num_classes, uniq % num_classes, counts], axis=1)
    return rows[np.lexsort((rows[:, 1], rows[:, 0], -rows[:, 2]))]


class EvalAccumulator:
    """Additive evaluation state on one rank.

    Memory: ``3 x C`` counts on ``device`` plus 8 bytes per sample seen (the flat confusion cell), so
    10,000 classes cost 240 KB, not the 800 MB of a dense ``C x C`` int64 matrix.

    Args:
        num_classes: C.
        device: where the sums live (the accelerator's device, so ``all_reduce`` works with NCCL).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)  # support, predicted, correct
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top5_hits = torch.zeros((), dtype=torch.int64, device=device)
        self.cells: list[torch.Tensor] = []  # (B,) int64 true * C + pred, on device (no sync per batch)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch. logits: (B, C) float, labels: (B,) int64 in [0, C)."""
        logits = logits.float()
        c = self.num_classes
        self.loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.argmax(dim=1)
        self.counts[0] += torch.bincount(labels, minlength=c)
        self.counts[1] += torch.bincount(pred, minlength=c)
        self.counts[2] += torch.bincount(labels[pred == labels], minlength=c)
        self.cells.append(labels * c + pred)
        if c >= 5:
            top5 = logits.topk(5, dim=1).indices
            self.top5_hits += (top5 == labels[:, None]).any(dim=1).sum()

    def local_confused(self) -> np.ndarray:
        """This rank's off-diagonal confusion cells, ``(K, 3)`` as in :func:`count_cells`."""
        cells = torch.cat(self.cells).cpu().numpy() if self.cells else np.zeros(0, dtype=np.int64)
        c = self.num_classes
        return count_cells(cells[cells // c != cells % c], c)

    def reduce(self, accelerator=None) -> EvalResult:
        """Sum over ranks and compute the metrics (two collectives; every rank must call it).

        The counts travel as float64 in one ``all_reduce`` (exact below 2**53 samples); the sparse
        off-diagonal cells with one ``gather_object``.
        """
        packed = torch.cat([self.counts.flatten().double(), self.loss_sum.view(1), self.top5_hits.double().view(1)])
        confused = self.local_confused()
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
            from accelerate.utils import gather_object
            parts = gather_object([confused])
            rows = np.concatenate(parts)
            confused = count_cells(rows[:, 0] * self.num_classes + rows[:, 1], self.num_classes, rows[:, 2])
        c = self.num_classes
        counts = packed[: 3 * c].round().long().view(3, c).cpu().numpy()
        loss_sum, top5_hits = packed[3 * c].item(), packed[3 * c + 1].item()
        n = int(counts[0].sum())
        return EvalResult(
            loss=loss_sum / max(n, 1),
            top1=float(counts[2].sum() / max(n, 1)),
            top5=(top5_hits / max(n, 1)) if c >= 5 else None,
            num_samples=n, support=counts[0], predicted=counts[1], correct=counts[2], confused=confused,
        )
