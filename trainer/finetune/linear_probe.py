"""Linear probe: multinomial logistic regression on frozen features, full-batch L-BFGS (the one solver).

The standard protocol for judging pretrained features (Kornblith, Shlens & Le, "Do Better ImageNet
Models Transfer Better?", CVPR 2019, sec. 3: L-BFGS logistic regression on the penultimate-layer
features, L2 penalty chosen on held-out data; the same in Radford et al. 2021, CLIP, appendix A.3).
Kornblith et al. use scikit-learn's L-BFGS logistic regression; here it is ``torch.optim.LBFGS``
(strong-Wolfe line search) on the same objective, in float64:

    loss(W, b) = mean_i w_{y_i} CE(W z_i + b, y_i) / mean_i w_{y_i} + lambda / 2 * ||W||_F^2

with ``z = (x - mu) / sigma`` the features standardised with the training rows' statistics (better
conditioning; the regulariser then acts on comparable scales), class weights ``w`` (1 by default), the
bias not penalised. One fit per lambda of a grid, from the strongest down, each warm-started from the
previous; the lambda with the best validation top-1 wins. The standardisation is folded back into the
returned head, ``W' = W / sigma``, ``b' = b - W' mu``, so it is a plain ``nn.Linear`` on raw features.
Everything is deterministic (full batch, float64, weights start at 0).

* :func:`fit_linear_probe`: given train and validation features (``finetune.strategy: linear_probe``,
  wired in :mod:`trainer.train.probe_stage`; ``bench/resolution.py``).
* :func:`fit_linear_probe_holdout`: only training features; lambda chosen on a stratified held-out part
  of them, then refitted on all (backbone selection, :mod:`trainer.selection`).
* :func:`fit_linear_probe_multilabel`: multi-label (``data.task: multilabel``): one logistic regression per
  class, the same protocol with the objective

      loss(W, b) = mean_{i,c} BCE(W z_i + b, Y_ic; pos_weight_c) + lambda / 2 * ||W||_F^2

  (sigmoid cross-entropy averaged over the ``N x C`` labels, ``pos_weight`` = ``optim.pos_weight``), lambda
  chosen by the validation macro mAP (a scoring function the caller passes: the trainer's is
  :func:`trainer.reporting.multilabel.mean_average_precision`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_L2_GRID", "ProbeResult", "fit_linear_probe", "fit_linear_probe_holdout",
           "fit_linear_probe_multilabel"]

DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""L2 penalties tried by :func:`fit_linear_probe_holdout` (the trainer's grid is ``finetune.lp_l2_grid``)."""


@dataclass
class ProbeResult:
    """A fitted linear probe: ``logits = x @ weight.T + bias`` on raw (unstandardised) features.

    Attributes:
        weight: ``(C, F)`` float32, bias: ``(C,)`` float32.
        l2: the chosen lambda. val_top1 / val_loss: of the chosen fit on the validation (or held-out)
            rows (loss unregularised, unweighted; NaN without such rows).
        grid: per lambda tried ``{"l2", "val_top1", "val_loss", "train_top1", "iters"}`` (multi-label:
            ``{"l2", "val_map", "val_loss", "train_map", "iters"}``).
        seconds: wall time of all fits.
        val_map: multi-label: the validation macro mAP of the chosen fit (val_top1 is then NaN); NaN otherwise.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    val_top1: float
    val_loss: float
    grid: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    val_map: float = float("nan")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` features (any float dtype) -> ``(N, C)`` float64 logits."""
        return x.to(torch.float64) @ self.weight.double().T + self.bias.double()

    def top1(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of rows of ``x`` whose arg-max logit equals ``y`` (``(N,)`` int); NaN for N = 0."""
        return _top1(self.logits(x), y.to(torch.int64))


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item() if len(y) else float("nan")


def _lbfgs(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: float, max_iter: int, data_loss) -> int:
    """Minimise ``data_loss(z @ w.T + b) + lam / 2 * ||w||^2`` over ``w``, ``b`` in place (leaf tensors) with
    L-BFGS (strong Wolfe line search); returns the iterations. ``data_loss`` is the mean cross-entropy of the
    logits (softmax for one label per image, sigmoid per class for label sets)."""
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = data_loss(z @ w.T + b) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[w].get("n_iter", 0))


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                     num_classes: int, l2_grid: Iterable[float], max_iter: int = 200,
                     class_weight: torch.Tensor | None = None) -> ProbeResult:
    """Multinomial logistic regression by full-batch L-BFGS, L2 chosen on val (see the module docstring).

    Args:
        x_train: ``(N, F)`` features; y_train: ``(N,)`` labels in ``[0, num_classes)``.
        x_val, y_val: validation features / labels; the lambda with the best val top-1 wins (ties: lower
            val loss, then the stronger regularisation). Empty: the strongest lambda reaching the best
            *train* top-1 wins.
        l2_grid: lambdas > 0, tried from the largest down, each warm-started from the previous fit.
        max_iter: L-BFGS iterations per lambda.
        class_weight: optional ``(C,)`` per-class loss weights (``optim.class_weights``).

    Returns:
        :class:`ProbeResult` with the head on raw features.

    Raises:
        ValueError: empty training set, shape mismatch, labels out of range, or a lambda <= 0.
    """
    t0 = time.perf_counter()
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    if not grid or any(v <= 0 for v in grid):
        raise ValueError(f"finetune.lp_l2_grid must hold numbers > 0, got {grid}")
    if x_train.ndim != 2 or len(x_train) == 0 or len(x_train) != len(y_train):
        raise ValueError(f"linear probe: need (N, F) training features with N labels, got {tuple(x_train.shape)} "
                         f"and {tuple(y_train.shape)}")
    if int(y_train.min()) < 0 or int(y_train.max()) >= num_classes:
        raise ValueError(f"linear probe: labels outside [0, {num_classes}), got {int(y_train.min())}.."
                         f"{int(y_train.max())}")
    with torch.inference_mode(False), torch.enable_grad():  # any caller context; inference tensors copied
        xt = x_train.detach().to(torch.float64).clone()
        xv = x_val.detach().to(torch.float64).clone().reshape(-1, xt.shape[1])
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
        zt, zv = (xt - mu) / sd, (xv - mu) / sd
        yt, yv = y_train.detach().long().clone(), y_val.detach().long().clone()
        cw = None if class_weight is None else class_weight.detach().double().clone()
        w = torch.zeros(num_classes, xt.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        results, best = [], None
        for lam in grid:
            iters = _lbfgs(zt, w, b, lam, max_iter, lambda logits: F.cross_entropy(logits, yt, weight=cw))
            with torch.no_grad():
                train_top1 = _top1(zt @ w.T + b, yt)
                lv = zv @ w.T + b
                val_top1 = _top1(lv, yv)
                val_loss = F.cross_entropy(lv, yv).item() if len(yv) else float("nan")
            rec = {"l2": lam, "val_top1": val_top1, "val_loss": val_loss, "train_top1": train_top1, "iters": iters}
            results.append(rec)
            key = (train_top1,) if not len(yv) else (val_top1, -val_loss)
            if best is None or key > best[0]:
                best = (key, rec, w.detach().clone(), b.detach().clone())
    _, rec, wb, bb = best
    weight = wb / sd  # fold the standardisation into the head: W' = W / sigma, b' = b - W' mu
    bias = bb - weight @ mu
    return ProbeResult(weight=weight.float(), bias=bias.float(), l2=rec["l2"], val_top1=rec["val_top1"],
                       val_loss=rec["val_loss"], grid=results, seconds=time.perf_counter() - t0)


def fit_linear_probe_multilabel(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                                y_val: torch.Tensor, *, l2_grid: Iterable[float],
                                score: Callable[[torch.Tensor, torch.Tensor], float], max_iter: int = 200,
                                pos_weight: torch.Tensor | None = None) -> ProbeResult:
    """Multi-label logistic regression (one sigmoid per class) by full-batch L-BFGS, L2 chosen on val by ``score``.

    Args:
        x_train: ``(N, F)`` features; y_train: ``(N, C)`` 0/1 label sets (C = its width).
        x_val, y_val: ``(M, F)`` / ``(M, C)``; the lambda with the best ``score`` on val wins (ties: lower val
            loss, then the stronger regularisation; a NaN score counts as the worst). M = 0: the strongest
            lambda reaching the best *train* score wins.
        l2_grid: lambdas > 0, tried from the largest down, each warm-started from the previous fit.
        score: ``(logits (M, C) float64, targets (M, C) float64) -> float``, higher is better (macro mAP).
        max_iter: L-BFGS iterations per lambda.
        pos_weight: optional ``(C,)`` weights of the positive terms (``optim.pos_weight``).

    Returns:
        :class:`ProbeResult` with the head on raw features; ``val_map`` = the chosen fit's val score,
        ``val_top1`` NaN, ``val_loss`` its unregularised, unweighted val BCE.

    Raises:
        ValueError: empty training set, shapes that do not fit, labels not 0/1, or a lambda <= 0.
    """
    t0 = time.perf_counter()
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    if not grid or any(v <= 0 for v in grid):
        raise ValueError(f"finetune.lp_l2_grid must hold numbers > 0, got {grid}")
    if x_train.ndim != 2 or y_train.ndim != 2 or len(x_train) == 0 or len(x_train) != len(y_train):
        raise ValueError(f"linear probe: need (N, F) training features with (N, C) label sets, got "
                         f"{tuple(x_train.shape)} and {tuple(y_train.shape)}")
    if not bool(((y_train == 0) | (y_train == 1)).all()):
        raise ValueError("linear probe: multi-label targets must be 0/1")
    num_classes = y_train.shape[1]

    def worst_if_nan(v: float) -> float:
        return v if v == v else float("-inf")

    with torch.inference_mode(False), torch.enable_grad():
        xt = x_train.detach().to(torch.float64).clone()
        xv = x_val.detach().to(torch.float64).clone().reshape(-1, xt.shape[1])
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
        zt, zv = (xt - mu) / sd, (xv - mu) / sd
        yt = y_train.detach().to(torch.float64).clone()
        yv = y_val.detach().to(torch.float64).clone().reshape(-1, num_classes)
        pw = None if pos_weight is None else pos_weight.detach().double().clone()
        w = torch.zeros(num_classes, xt.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        results, best = [], None
        for lam in grid:
            iters = _lbfgs(zt, w, b, lam, max_iter,
                           lambda logits: F.binary_cross_entropy_with_logits(logits, yt, pos_weight=pw))
            with torch.no_grad():
                train_map = score(zt @ w.T + b, yt)
                lv = zv @ w.T + b
                val_map = score(lv, yv) if len(yv) else float("nan")
                val_loss = F.binary_cross_entropy_with_logits(lv, yv).item() if len(yv) else float("nan")
            rec = {"l2": lam, "val_map": val_map, "val_loss": val_loss, "train_map": train_map, "iters": iters}
            results.append(rec)
            key = (worst_if_nan(train_map),) if not len(yv) else (worst_if_nan(val_map), -val_loss)
            if best is None or key > best[0]:
                best = (key, rec, w.detach().clone(), b.detach().clone())
    _, rec, wb, bb = best
    weight = wb / sd
    bias = bb - weight @ mu
    return ProbeResult(weight=weight.float(), bias=bias.float(), l2=rec["l2"], val_top1=float("nan"),
                       val_loss=rec["val_loss"], grid=results, seconds=time.perf_counter() - t0,
                       val_map=rec["val_map"])


def _stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out): ``fraction`` of each class held out (at least 1 if the class has >= 2)."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(fraction * len(idx)))) if len(idx) >= 2 else 0
        held.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def fit_linear_probe_holdout(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float | None = None,
                             l2_grid: Sequence[float] = DEFAULT_L2_GRID, held_out_fraction: float = 0.2,
                             max_iter: int = 200, seed: int = 0) -> ProbeResult:
    """:func:`fit_linear_probe` with lambda chosen on a stratified held-out part of the training rows.

    With ``l2=None`` the grid is fitted on ``1 - held_out_fraction`` of each class (seeded by ``seed``) and
    scored on the rest; the chosen lambda is then refitted on all rows. The result's ``grid``,
    ``val_top1`` and ``val_loss`` are the held-out figures; with ``l2`` given, only that lambda is fitted
    on all rows (no held-out figures).

    Raises:
        ValueError: mismatched or empty inputs, labels out of range, a bad ``l2`` / fraction.
    """
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"linear probe: need x (N, F) and y (N,) with N > 0, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if l2 is not None and not l2 > 0:
        raise ValueError(f"linear probe: l2 must be > 0, got {l2}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"linear probe: held_out_fraction must be in (0, 1), got {held_out_fraction}")
    t0 = time.perf_counter()
    y = y.to(torch.int64)
    none = x[:0]
    held_out = None
    if l2 is None:
        fit_idx, held_idx = _stratified_holdout(y, held_out_fraction, seed)
        if len(fit_idx) == 0:  # classes of 2 with a large fraction: nothing left to fit, no hold-out
            fit_idx, held_idx = held_idx, held_idx[:0]
        held_out = fit_linear_probe(x[fit_idx], y[fit_idx], x[held_idx], y[held_idx], num_classes=num_classes,
                                    l2_grid=l2_grid, max_iter=max_iter)
        l2 = held_out.l2
    res = fit_linear_probe(x, y, none, y[:0], num_classes=num_classes, l2_grid=[l2], max_iter=max_iter)
    if held_out is not None:
        res.val_top1, res.val_loss, res.grid = held_out.val_top1, held_out.val_loss, held_out.grid
    res.seconds = time.perf_counter() - t0
    return res
