"""Multi-label metrics and per-class thresholds: pure functions on ``(N, C)`` tensors, no state, no ranks.

``N`` samples, ``C`` classes. ``scores`` are per-class scores where higher means "more likely present"
(sigmoid probabilities or logits: the ranking metrics only use their order); ``probs`` are sigmoid
probabilities in [0, 1]; ``targets`` are 0/1 (bool, int or float) ``(N, C)``; ``preds`` are 0/1 predicted
label sets. Sums run in float64 / int64, so results do not depend on the input dtype beyond its rounding.

Definitions (scikit-learn's, checked against torchmetrics and scikit-learn in ``tests/test_multilabel_metrics.py``):

* **Average precision** of class c (``sklearn.metrics.average_precision_score``): sort the samples by
  score, descending; every distinct score value is a threshold (tied scores enter together);
  ``AP = sum_n (R_n - R_{n-1}) P_n`` with precision ``P_n`` and recall ``R_n`` at the n-th threshold
  and ``R_0 = 0``. No interpolation. A class without positive samples has no AP: NaN.
* **mAP** (macro): the mean AP over the classes that have at least one positive (NaN if none has).
  **Micro mAP**: the AP of all ``N x C`` (score, target) pairs pooled as one class.
* **F1** at thresholds: a label is predicted when ``prob >= threshold`` of its class (torchmetrics uses
  ``>``; the two differ only for probabilities equal to a threshold). Per class
  ``F1 = 2 TP / (2 TP + FP + FN)``, 0 where that denominator is 0 (a class neither present nor
  predicted; scikit-learn's ``zero_division=0``). Macro F1 = mean over all C classes; micro F1 from
  the summed TP, FP, FN.
* **Exact-set accuracy** (subset accuracy): fraction of samples whose predicted label set equals the
  true set exactly. **Hamming loss**: fraction of the ``N x C`` labels predicted wrongly.

Thresholds (:func:`choose_thresholds`): for each class with at least ``min_positives`` positives on val,
the threshold that maximises that class's F1 on val; classes with fewer positives get ``default``
(0.5). The rule and its tie-breaking are in the function's docstring; it is deterministic (same
inputs, same thresholds, whatever the device or the order of tied scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_THRESHOLD = 0.5
MIN_POSITIVES = 5
BLOCK_ELEMENTS = 1 << 22  # (N x classes) elements per block: ~32 MiB per float64 temporary


def _as_2d(x, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, C) (or (N,) for one class), got shape {tuple(t.shape)}")
    return t.to(dtype)


def _check_pair(scores, targets, *, scores_name: str = "scores") -> tuple[torch.Tensor, torch.Tensor]:
    s = _as_2d(scores, scores_name, torch.float64)
    y = _as_2d(targets, "targets", torch.float64)
    if s.shape != y.shape:
        raise ValueError(f"{scores_name} {tuple(s.shape)} and targets {tuple(y.shape)} differ in shape")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{scores_name} contain NaN or inf")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("targets must be 0/1")
    return s, y


def _ranked(scores: torch.Tensor, targets: torch.Tensor):
    """Per class (column), samples sorted by score descending. Returns ``(sorted_scores, tp, last)``, each
    ``(N, C)``: cumulative true positives at each rank and whether a rank closes a group of tied scores
    (only those ranks are thresholds)."""
    sorted_scores, order = torch.sort(scores, dim=0, descending=True, stable=True)
    tp = torch.cumsum(torch.gather(targets, 0, order), dim=0)
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    return sorted_scores, tp, last


def average_precision(scores, targets) -> torch.Tensor:
    """Per-class average precision (scikit-learn's definition, see the module docstring).

    Args:
        scores: ``(N, C)`` (or ``(N,)``) finite scores, higher = more likely positive.
        targets: ``(N, C)`` (or ``(N,)``) 0/1.

    Returns:
        ``(C,) float64`` AP in [0, 1]; NaN for a class without positives.

    Raises:
        ValueError: shapes differ or are not 1-/2-D, non-finite scores, targets not 0/1.
    """
    s, y = _check_pair(scores, targets)
    n, c = s.shape
    if n == 0 or c == 0:
        return torch.full((c,), float("nan"), dtype=torch.float64)
    block = _block_columns(n)
    return torch.cat([_average_precision_block(s[:, i:i + block], y[:, i:i + block]) for i in range(0, c, block)])


def _block_columns(n: int) -> int:
    """Classes processed together, so the temporaries of the sort stay near ``BLOCK_ELEMENTS`` per tensor."""
    return max(1, BLOCK_ELEMENTS // max(n, 1))


def _average_precision_block(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, c = s.shape
    _, tp, last = _ranked(s, y)
    positives = tp[-1]
    precision = tp / torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    # true positives at the previous threshold: tp is non-decreasing, so the running max of tp over the
    # earlier threshold ranks is the tp of the last one before this rank
    tp_at_last = torch.where(last, tp, torch.zeros_like(tp))
    prev = torch.cat([torch.zeros(1, c, dtype=torch.float64), torch.cummax(tp_at_last, dim=0).values[:-1]])
    gained = torch.where(last, tp - prev, torch.zeros_like(tp))
    ap = (gained * precision).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores, targets) -> float:
    """Macro mAP: mean of :func:`average_precision` over the classes with at least one positive.

    Args/Raises: as :func:`average_precision`. Returns NaN when no class has a positive.
    """
    ap = average_precision(scores, targets)
    ap = ap[~torch.isnan(ap)]
    return float(ap.mean()) if ap.numel() else float("nan")


def micro_average_precision(scores, targets) -> float:
    """Micro mAP: the AP of all ``N x C`` (score, target) pairs as one class (``average="micro"`` in
    scikit-learn). Args/Raises: as :func:`average_precision`; NaN without any positive."""
    s, y = _check_pair(scores, targets)
    return float(average_precision(s.reshape(-1), y.reshape(-1))[0])


def binarize(probs, thresholds: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Predicted label sets: ``probs >= thresholds``.

    Args:
        probs: ``(N, C)`` probabilities.
        thresholds: one value for all classes or ``(C,)`` per class.

    Returns:
        ``(N, C) bool``.

    Raises:
        ValueError: a per-class threshold vector whose length is not C, or NaN thresholds.
    """
    p = _as_2d(probs, "probs", torch.float64)
    t = torch.as_tensor(thresholds, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() not in (1, p.shape[1]):
        raise ValueError(f"thresholds: expected 1 or {p.shape[1]} values (one per class), got {t.numel()}")
    if bool(torch.isnan(t).any()):
        raise ValueError("thresholds contain NaN")
    return p >= t[None, :]


def _check_sets(preds, targets) -> tuple[torch.Tensor, torch.Tensor]:
    p = _as_2d(preds, "preds", torch.float64)
    y = _as_2d(targets, "targets", torch.float64)
    if p.shape != y.shape:
        raise ValueError(f"preds {tuple(p.shape)} and targets {tuple(y.shape)} differ in shape")
    for name, t in (("preds", p), ("targets", y)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be 0/1")
    return p.bool(), y.bool()


def f1_scores(preds, targets) -> dict:
    """Per-class, macro and micro F1 of predicted label sets (definitions in the module docstring).

    Args:
        preds: ``(N, C)`` 0/1 predicted sets (e.g. :func:`binarize` of the probabilities).
        targets: ``(N, C)`` 0/1 true sets.

    Returns:
        ``{"f1": (C,) float64, "precision": (C,), "recall": (C,), "tp": (C,) int64, "fp": (C,), "fn": (C,),
        "support": (C,) int64 (positives), "macro_f1": float, "micro_f1": float}``; precision / recall
        are 0 where their denominator is 0.

    Raises:
        ValueError: shapes differ, values not 0/1.
    """
    p, y = _check_sets(preds, targets)
    tp = (p & y).sum(0)
    fp = (p & ~y).sum(0)
    fn = (~p & y).sum(0)

    def ratio(num, den):
        num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    micro = ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return {"f1": f1, "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "tp": tp, "fp": fp,
            "fn": fn, "support": y.sum(0), "macro_f1": float(f1.mean()) if f1.numel() else float("nan"),
            "micro_f1": float(micro)}


def f1_at_thresholds(probs, targets, thresholds: float | Sequence[float] | torch.Tensor) -> dict:
    """:func:`f1_scores` of ``binarize(probs, thresholds)``; same arguments, returns and errors."""
    return f1_scores(binarize(probs, thresholds), targets)


def exact_set_accuracy(preds, targets) -> float:
    """Fraction of samples whose predicted label set equals the true set (``(N, C)`` 0/1 each; NaN for
    N = 0). Raises ValueError as :func:`f1_scores`."""
    p, y = _check_sets(preds, targets)
    return float((p == y).all(1).double().mean()) if p.shape[0] else float("nan")


def hamming_loss(preds, targets) -> float:
    """Fraction of the ``N x C`` labels predicted wrongly (``(N, C)`` 0/1 each; NaN when empty). Raises
    ValueError as :func:`f1_scores`."""
    p, y = _check_sets(preds, targets)
    return float((p != y).double().mean()) if p.numel() else float("nan")


def choose_thresholds(probs, targets, *, min_positives: int = MIN_POSITIVES,
                      default: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Per-class decision thresholds chosen on validation data, maximising each class's F1.

    Rule, per class c with ``P_c`` positives among the N samples:

    * ``P_c < min_positives`` (a handful of positives gives a noisy optimum): ``default`` (0.5).
    * otherwise the candidates are the distinct probabilities of class c; candidate ``s`` predicts
      ``prob >= s`` and scores ``F1 = 2 TP / (TP + FP + P_c)``. Of the candidates with the highest F1 the
      largest ``s`` wins (fewest predicted labels). The threshold returned is the midpoint between that
      ``s`` and the next lower distinct probability (``s`` itself if there is none, or if the midpoint
      rounds onto the lower value), so it reproduces the chosen label sets on val exactly and leaves
      margin on both sides.

    Deterministic: the result depends only on the values, not on the sample order or the device.

    Args:
        probs: ``(N, C)`` sigmoid probabilities (finite).
        targets: ``(N, C)`` 0/1.
        min_positives: >= 1; classes with fewer positives get ``default``.
        default: threshold for those classes, in [0, 1].

    Returns:
        ``(C,)`` thresholds in the dtype of ``probs`` (float32 for non-float input).

    Raises:
        ValueError: as :func:`average_precision`, or ``min_positives < 1``, ``default`` outside [0, 1].
    """
    if int(min_positives) != min_positives or min_positives < 1:
        raise ValueError(f"choose_thresholds: min_positives must be an integer >= 1, got {min_positives}")
    if not 0.0 <= default <= 1.0:
        raise ValueError(f"choose_thresholds: default must be in [0, 1], got {default}")
    raw = torch.as_tensor(probs) if not isinstance(probs, np.ndarray) else torch.from_numpy(probs)
    dtype = raw.dtype if raw.is_floating_point() else torch.float32
    _, y = _check_pair(probs, targets, scores_name="probs")
    p = _as_2d(raw, "probs", dtype)  # compare in the caller's precision: the thresholds must split *its* values
    n, c = p.shape
    out = torch.full((c,), default, dtype=dtype)
    positives = y.sum(0)
    chosen = positives >= min_positives
    if n == 0 or not bool(chosen.any()):
        return out
    block = _block_columns(n)
    for i in range(0, c, block):
        sl = slice(i, i + block)
        threshold = _best_f1_thresholds(p[:, sl], y[:, sl], positives[sl])
        out[sl] = torch.where(chosen[sl], threshold, out[sl])
    return out


def _best_f1_thresholds(p: torch.Tensor, y: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    n = p.shape[0]
    sorted_p, order = torch.sort(p, dim=0, descending=True, stable=True)
    tp = torch.cumsum(torch.gather(y, 0, order), dim=0)
    last = torch.ones_like(sorted_p, dtype=torch.bool)
    last[:-1] = sorted_p[:-1] != sorted_p[1:]
    predicted = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    f1 = torch.where(last, 2 * tp / (predicted + positives[None, :]), torch.full_like(tp, -1.0))
    best = torch.argmax(f1, dim=0)  # first maximum = highest threshold among equal F1
    upper = sorted_p.gather(0, best[None, :])[0]
    lower = sorted_p.gather(0, (best + 1).clamp(max=n - 1)[None, :])[0]
    mid = (upper + lower) / 2
    return torch.where((best + 1 < n) & (mid > lower), mid, upper)
