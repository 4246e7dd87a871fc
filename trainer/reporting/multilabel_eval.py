"""Multi-label evaluation, exact across ranks with memory bounded per class: per-class histograms of sigmoid scores.

``data.task: multilabel`` runs evaluate with :class:`MultiLabelAccumulator` (``trainer.train.loop.evaluate``)
instead of the single-label :class:`trainer.reporting.metrics.EvalAccumulator`. ``C`` classes, ``N`` samples.

**State per rank** (additive, summed over ranks with one ``all_reduce``):

* two histograms per class of the sigmoid probabilities ``p = sigmoid(logit)``, one of the positive and one of the
  negative labels, over :data:`NUM_BINS` (1024) fixed bins: ``2 x C x 1024`` int64 = 16 KB per class whatever N
  (1000 classes: 16 MB). The bin edges :data:`BIN_EDGES` are ``0`` and ``sigmoid(z)`` for 1023 logits ``z`` evenly
  spaced over [-12, 12] (step 0.0235; 0.5 is an edge), rounded to float32: bin ``k`` holds
  ``BIN_EDGES[k] <= p < BIN_EDGES[k + 1]``; logits beyond +-12 share the end bins;
* the summed BCE-with-logits of every label (``val/loss``: mean over the ``N x C`` labels, unweighted, no label
  smoothing, like the single-label ``val/loss``) and N;
* thresholds chosen on this data (validation): each sample's bin per class, int16, and its label set, bool
  (3 bytes per label of the rank's own samples, kept to count the exactly right label sets once the thresholds
  are known; the same order as the logits the model produced); thresholds given (a saved checkpoint's,
  ``evaluate``): per class TP / FP / FN and the count of exactly right sets at ``p >= threshold``, ``3 x C + 1``.

Because every validation sample is read by exactly one rank and the state is integer counts, the result is the
same for any number of ranks and any split of the samples (``tests/test_multilabel_train.py``).

**Average precision from the histograms.** The bins are the thresholds: scores in one bin count as tied, so the
AP of class c is scikit-learn's AP (:func:`trainer.reporting.multilabel.average_precision`, ties entering
together) of the *bin indices* — exactly. Against the AP of the unbinned scores the only difference is the
order inside a bin. Bound (computed and logged as ``val/mAP_error_bound``): a positive in bin b contributes the
precision at some point of the bin, at least ``(TP0 + 1) / (n0 + neg_b + 1)`` and at most
``(TP0 + pos_b) / (n0 + pos_b)`` (``TP0``, ``n0``: positives and samples in the higher bins), so
``|AP_exact - AP_binned| <= sum_b pos_b (max_b - min_b) / P``; ``val/mAP_error_bound`` is its mean over the
classes with positives. Micro mAP: the same on the histograms summed over classes. A class with few samples per
bin has a bound near 0; samples piled in one bin (e.g. logits > 12) make it grow, and it says so.

**Thresholds** (:func:`choose_threshold_bins`): :func:`trainer.reporting.multilabel.choose_thresholds`'s rule with
the bin edges as the candidates: classes with fewer than ``MIN_POSITIVES`` (5) positives get 0.5; the others the
edge maximising F1 (ties: the highest, fewest labels predicted), moved to the middle edge of the empty bins below
the lowest predicted bin (the same label sets, with margin). Deterministic: a function of the histograms only.
A label is predicted when ``p >= threshold``; for an edge this is exactly ``bin >= k`` (the edges are float32 and
compared with the float32 probability), so the F1, exact-set accuracy and Hamming loss computed from the bins equal
those of applying the thresholds to the probabilities (``finetune predict``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.reporting.multilabel import DEFAULT_THRESHOLD, MIN_POSITIVES
from trainer.files.atomic import atomic_write

__all__ = ["BIN_EDGES", "NUM_BINS", "MultiLabelAccumulator", "MultiLabelResult", "binned_average_precision",
           "choose_threshold_bins", "score_bins", "write_per_class_csv"]

LOGIT_RANGE = 12.0


def _edges() -> torch.Tensor:
    z = torch.linspace(-LOGIT_RANGE, LOGIT_RANGE, 1023, dtype=torch.float64)
    e = torch.cat([torch.zeros(1, dtype=torch.float64), torch.sigmoid(z), torch.tensor([DEFAULT_THRESHOLD],
                                                                                      dtype=torch.float64)])
    return torch.unique(e.to(torch.float32))  # sorted, distinct


BIN_EDGES: torch.Tensor = _edges()
"""``(NUM_BINS,) float32`` lower edges of the score bins, increasing from 0 (see the module docstring)."""
NUM_BINS: int = int(BIN_EDGES.numel())
_HALF_BIN = int(torch.nonzero(BIN_EDGES == DEFAULT_THRESHOLD)[0, 0])


def score_bins(probs: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
    """Bin index of each probability: ``k`` with ``edges[k] <= p < edges[k + 1]`` (the last bin up to 1).

    Args:
        probs: any shape, float32 probabilities in [0, 1]. edges: :data:`BIN_EDGES` (on ``probs``' device).

    Returns:
        int64 tensor of ``probs``' shape in ``[0, NUM_BINS)``.
    """
    e = BIN_EDGES.to(probs.device) if edges is None else edges
    return (torch.bucketize(probs.float(), e, right=True) - 1).clamp_(0, e.numel() - 1)


def binned_average_precision(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AP per row of score histograms, and the bound on its distance to the AP of the unbinned scores.

    Args:
        pos, neg: ``(R, K)`` counts of positive / negative labels per bin (bin K-1 = highest scores).

    Returns:
        ``(ap, bound)``, each ``(R,) float64``: AP with each bin's samples tied (scikit-learn's definition), and
        ``sum_b pos_b (max_b - min_b) / P`` (module docstring); NaN for a row without positives.
    """
    p, q = pos.flip(1).to(torch.float64), neg.flip(1).to(torch.float64)  # highest scores first
    tp_end, n_end = p.cumsum(1), (p + q).cumsum(1)
    tp0, n0 = tp_end - p, n_end - p - q
    total = tp_end[:, -1]
    ap = (p * tp_end / n_end.clamp(min=1)).sum(1) / total.clamp(min=1)
    high = (tp0 + p) / (n0 + p).clamp(min=1)
    low = (tp0 + 1) / (n0 + q + 1)
    bound = (p * torch.where(p > 0, high - low, torch.zeros_like(p))).sum(1) / total.clamp(min=1)
    nan = torch.full_like(ap, float("nan"))
    return torch.where(total > 0, ap, nan), torch.where(total > 0, bound, nan)


def choose_threshold_bins(pos: torch.Tensor, neg: torch.Tensor, *, min_positives: int = MIN_POSITIVES) -> torch.Tensor:
    """Per-class threshold edge index ``k`` (predict ``bin >= k``, i.e. ``p >= BIN_EDGES[k]``), rule in the
    module docstring.

    Args:
        pos, neg: ``(C, NUM_BINS)`` positive / negative counts per bin. min_positives: >= 1.

    Returns:
        ``(C,) int64`` edge indices; the edge of 0.5 for classes with fewer than ``min_positives`` positives.
    """
    pos, neg = pos.to(torch.float64), neg.to(torch.float64)
    k_all = pos.shape[1]
    tp = pos.flip(1).cumsum(1).flip(1)  # TP_k: positives with bin >= k
    pred = (pos + neg).flip(1).cumsum(1).flip(1)  # labels predicted at edge k
    total = tp[:, :1]
    f1 = torch.where(pred + total > 0, 2 * tp / (pred + total).clamp(min=1), torch.zeros_like(tp))
    is_max = f1 == f1.max(1, keepdim=True).values
    best = (k_all - 1) - is_max.flip(1).to(torch.int32).argmax(1)  # the highest edge of the best F1
    pred_best = pred.gather(1, best[:, None])
    low = (pred > pred_best).sum(1)  # the lowest edge predicting the same label set
    mid = (low + best + 1) // 2
    return torch.where(total[:, 0] >= min_positives, mid, torch.full_like(mid, _HALF_BIN))


@dataclass
class MultiLabelResult:
    """Reduced multi-label metrics (definitions: :mod:`trainer.reporting.multilabel` and the module docstring).

    Attributes:
        loss: mean BCE-with-logits per label (``N x C``). num_samples: N over all ranks.
        ap, ap_error_bound: ``(C,) float64`` binned AP per class and its bound (NaN without positives).
        map_micro, map_micro_error_bound: micro mAP (all labels pooled) and its bound.
        thresholds: ``(C,) float32`` the thresholds the F1 / exact-set / Hamming figures use.
        thresholds_chosen: True when chosen on this data (validation), False when given (a checkpoint's).
        tp, fp, fn, support: ``(C,) int64`` at those thresholds; support = positives of the class.
        exact_sets: samples whose predicted label set equals the true one.
        pos_hist, neg_hist: ``(C, NUM_BINS) int64`` the reduced score histograms of the positive / negative labels
            (bin k: ``BIN_EDGES[k] <= p < BIN_EDGES[k + 1]``), for the precision-recall curves of the reports
            (:mod:`trainer.reporting.multilabel_plots`); None when not kept.
    """

    loss: float
    num_samples: int
    ap: np.ndarray
    ap_error_bound: np.ndarray
    map_micro: float
    map_micro_error_bound: float
    thresholds: np.ndarray
    thresholds_chosen: bool
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    support: np.ndarray
    exact_sets: int
    pos_hist: np.ndarray | None = None
    neg_hist: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.support.shape[0])

    @property
    def map(self) -> float:
        """Macro mAP: mean AP over the classes with positives (NaN if none)."""
        ok = ~np.isnan(self.ap)
        return float(self.ap[ok].mean()) if ok.any() else float("nan")

    @property
    def map_error_bound(self) -> float:
        """Bound on ``|mAP - mAP of the unbinned scores|``: the mean of the per-class bounds."""
        ok = ~np.isnan(self.ap_error_bound)
        return float(self.ap_error_bound[ok].mean()) if ok.any() else float("nan")

    def _ratio(self, num, den) -> np.ndarray:
        num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    @property
    def f1(self) -> np.ndarray:
        """``(C,)`` F1 = 2 TP / (2 TP + FP + FN), 0 where the denominator is 0."""
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> np.ndarray:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def f1_macro(self) -> float:
        """Mean F1 over all C classes (scikit-learn's ``average="macro"``, ``zero_division=0``)."""
        return float(self.f1.mean()) if self.num_classes else float("nan")

    @property
    def f1_micro(self) -> float:
        """F1 of the summed TP, FP, FN."""
        tp, fp, fn = int(self.tp.sum()), int(self.fp.sum()), int(self.fn.sum())
        return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0

    @property
    def exact_set_accuracy(self) -> float:
        return self.exact_sets / self.num_samples if self.num_samples else float("nan")

    @property
    def hamming_loss(self) -> float:
        """Fraction of the ``N x C`` labels predicted wrongly."""
        n = self.num_samples * self.num_classes
        return float(self.fp.sum() + self.fn.sum()) / n if n else float("nan")

    @property
    def top1(self) -> float:
        """Exact-set accuracy, the multi-label analogue of top-1 (for code that reads a result's ``top1``:
        ``best_top1`` of the run's progress and summary)."""
        return self.exact_set_accuracy

    def as_log(self, prefix: str = "val/") -> dict:
        """Scalars for metrics.jsonl / W&B: loss, mAP, mAP_micro, f1_micro, f1_macro, exact_set_accuracy,
        hamming_loss, num_samples, mAP_error_bound. Per-class figures go to ``reports/``."""
        return {f"{prefix}loss": self.loss, f"{prefix}mAP": self.map, f"{prefix}mAP_micro": self.map_micro,
                f"{prefix}f1_micro": self.f1_micro, f"{prefix}f1_macro": self.f1_macro,
                f"{prefix}exact_set_accuracy": self.exact_set_accuracy, f"{prefix}hamming_loss": self.hamming_loss,
                f"{prefix}num_samples": self.num_samples, f"{prefix}mAP_error_bound": self.map_error_bound}


class MultiLabelAccumulator:
    """Additive multi-label evaluation state on one rank (module docstring).

    Args:
        num_classes: C.
        device: where the state lives (the accelerator's device, so ``all_reduce`` works with NCCL).
        thresholds: ``(C,)`` per-class thresholds to evaluate at (a checkpoint's); None: chosen on this data.

    Raises:
        ValueError: thresholds of another length, NaN, or outside [0, 1].
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", thresholds=None):
        c = self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.edges = BIN_EDGES.to(self.device)
        self.hist = torch.zeros(2 * c * NUM_BINS, dtype=torch.int64, device=self.device)  # [neg | pos] x C x bins
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.thresholds = None
        self.sets = None
        self.bins: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        if thresholds is not None:
            t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
            if t.numel() != c or bool(torch.isnan(t).any()) or bool(((t < 0) | (t > 1)).any()):
                raise ValueError(f"thresholds: expected {c} values in [0, 1] (one per class), got {t.tolist()[:20]}")
            self.thresholds = t.to(self.device)
            self.sets = torch.zeros(3 * c + 1, dtype=torch.int64, device=self.device)  # tp, fp, fn, exact sets

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch. logits: ``(B, C)`` float; targets: ``(B, C)`` 0/1 label sets (float, int or bool).

        Raises:
            ValueError: shapes that are not ``(B, C)`` or differ.
        """
        c = self.num_classes
        if logits.ndim != 2 or logits.shape[1] != c or tuple(targets.shape) != tuple(logits.shape):
            raise ValueError(f"multi-label evaluation: logits {tuple(logits.shape)} and targets "
                             f"{tuple(targets.shape)} must both be (B, {c})")
        logits = logits.float()
        y = targets.to(self.device) > 0.5
        self.loss_sum += F.binary_cross_entropy_with_logits(logits.double(), y.double(), reduction="sum")
        probs = torch.sigmoid(logits)
        b = score_bins(probs, self.edges)
        idx = (y.long() * c + torch.arange(c, device=self.device)[None, :]) * NUM_BINS + b
        flat = idx.reshape(-1)
        self.hist.scatter_add_(0, flat, torch.ones_like(flat))
        self.count += logits.shape[0]
        if self.thresholds is None:
            self.bins.append(b.to(torch.int16))
            self.targets.append(y)
        else:
            pred = probs >= self.thresholds[None, :]
            self.sets[:c] += (pred & y).sum(0)
            self.sets[c:2 * c] += (pred & ~y).sum(0)
            self.sets[2 * c:3 * c] += (~pred & y).sum(0)
            self.sets[3 * c] += (pred == y).all(1).sum()

    def reduce(self, accelerator=None) -> MultiLabelResult:
        """Sum over ranks and compute the metrics. Every rank must call it: one ``all_reduce`` of the float64-packed
        counts (exact below 2**53), and with chosen thresholds a second one of the exactly-right-set count."""
        c, k = self.num_classes, NUM_BINS
        parts = [self.hist.double(), self.loss_sum.view(1), self.count.double().view(1)]
        if self.sets is not None:
            parts.append(self.sets.double())
        packed = torch.cat(parts)
        multi = accelerator is not None and accelerator.num_processes > 1
        if multi:
            packed = accelerator.reduce(packed, reduction="sum")
        packed = packed.cpu()
        hist = packed[:2 * c * k].round().long().view(2, c, k)
        loss_sum, n = packed[2 * c * k].item(), int(round(packed[2 * c * k + 1].item()))
        neg, pos = hist[0], hist[1]
        ap, ap_bound = binned_average_precision(pos, neg)
        micro, micro_bound = binned_average_precision(pos.sum(0, keepdim=True), neg.sum(0, keepdim=True))
        support = pos.sum(1)
        if self.sets is None:
            kbin = choose_threshold_bins(pos, neg)
            tp = pos.flip(1).cumsum(1).flip(1).gather(1, kbin[:, None])[:, 0]
            fp = neg.flip(1).cumsum(1).flip(1).gather(1, kbin[:, None])[:, 0]
            fn = support - tp
            kdev = kbin.to(self.device)
            exact = sum(((b >= kdev[None, :]) == y).all(1).sum() for b, y in zip(self.bins, self.targets))
            exact_t = torch.as_tensor(exact, dtype=torch.float64, device=self.device).reshape(1)
            if multi:
                exact_t = accelerator.reduce(exact_t, reduction="sum")
            exact_sets = int(round(exact_t.item()))
            thresholds = BIN_EDGES[kbin]
        else:
            sets = packed[2 * c * k + 2:].round().long()
            tp, fp, fn, exact_sets = sets[:c], sets[c:2 * c], sets[2 * c:3 * c], int(sets[3 * c])
            thresholds = self.thresholds.cpu()
        return MultiLabelResult(
            loss=loss_sum / max(n * c, 1), num_samples=n, ap=ap.numpy(), ap_error_bound=ap_bound.numpy(),
            map_micro=float(micro[0]), map_micro_error_bound=float(micro_bound[0]),
            thresholds=thresholds.numpy().astype(np.float32), thresholds_chosen=self.sets is None,
            tp=tp.numpy(), fp=fp.numpy(), fn=fn.numpy(), support=support.numpy(), exact_sets=exact_sets,
            pos_hist=pos.numpy(), neg_hist=neg.numpy())


PER_CLASS_COLUMNS = ["class", "support", "ap", "f1", "precision", "recall", "threshold", "tp", "fp", "fn"]


def per_class_rows(result: MultiLabelResult, class_names: Sequence[str]) -> list[list]:
    """Rows of :data:`PER_CLASS_COLUMNS`, one per class in label order (AP NaN for a class without positives)."""
    f1, prec, rec = result.f1, result.precision, result.recall
    return [[class_names[i], int(result.support[i]), float(result.ap[i]), float(f1[i]), float(prec[i]),
             float(rec[i]), float(result.thresholds[i]), int(result.tp[i]), int(result.fp[i]), int(result.fn[i])]
            for i in range(result.num_classes)]


def write_per_class_csv(result: MultiLabelResult, class_names: Sequence[str], path: str | Path) -> Path:
    """Write ``path`` (atomically): :data:`PER_CLASS_COLUMNS`; the false positives / negatives per class are the
    multi-label form of the confusion matrix. Floats with 6 significant digits, NaN empty."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(PER_CLASS_COLUMNS)
    for r in per_class_rows(result, class_names):
        w.writerow([("" if math.isnan(v) else f"{v:.6g}") if isinstance(v, float) else v for v in r])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, buf.getvalue())
