"""Linear probe: multinomial logistic regression on frozen features, full-batch L-BFGS.

The standard protocol for judging pretrained features (Kornblith, Shlens & Le, "Do Better ImageNet
Models Transfer Better?", CVPR 2019, sec. 3: L-BFGS logistic regression on the penultimate-layer
features, L2 penalty chosen on a held-out part of the training set; the same in Radford et al. 2021,
CLIP, appendix A.3). Features are standardised with the training mean/std; the bias is not
penalised. Everything is deterministic (full batch, float64, no random init: weights start at 0).

Used by backbone selection (:mod:`trainer.selection`) on cached features; any caller with a
``(N, F)`` feature matrix can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""L2 penalties tried (per sample: ``loss = mean CE + l2 / 2 * ||W||^2`` on standardised features)."""


@dataclasses.dataclass
class LinearProbe:
    """A fitted probe. ``logits = ((x - mean) / std) @ weight.T + bias``.

    Attributes:
        weight: ``(C, F)`` float64. bias: ``(C,)``. mean, std: ``(F,)`` training statistics.
        l2: the penalty used. held_out_top1: top-1 on the held-out part for each tried l2 (may be empty).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    l2: float
    held_out_top1: dict[float, float] = dataclasses.field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` features (any float dtype) -> ``(N, C)`` float64 logits."""
        z = (x.to(torch.float64) - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def top1(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of rows of ``x`` whose arg-max logit equals ``y`` (``(N,)`` int)."""
        if len(y) == 0:
            return float("nan")
        return float((self.logits(x).argmax(1) == y.to(torch.int64)).to(torch.float64).mean())


def _fit(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out): ``fraction`` of each class held out (at least 1 if the class has >= 2)."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx))) if len(idx) >= 2 else 0
        k = max(1, k) if len(idx) >= 2 else 0
        held.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                     l2: float | None = None, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                     held_out_fraction: float = 0.2, max_iter: int = 200, seed: int = 0) -> LinearProbe:
    """Fit a linear probe on ``(N, F)`` features ``x`` with labels ``y`` in ``[0, num_classes)``.

    With ``l2=None`` each penalty of ``l2_grid`` is fitted on a stratified ``1 - held_out_fraction``
    of the rows and scored (top-1) on the rest; the best (ties: the larger penalty) is refitted on all
    rows. L-BFGS (strong Wolfe line search) runs up to ``max_iter`` iterations per fit.

    Raises:
        ValueError: mismatched or empty inputs, labels out of range, a bad ``l2`` / fraction.
    """
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"fit_linear_probe: need x (N, F) and y (N,) with N > 0, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    y = y.to(torch.int64)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"fit_linear_probe: labels must be in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    if l2 is not None and l2 < 0:
        raise ValueError(f"fit_linear_probe: l2 must be >= 0, got {l2}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"fit_linear_probe: held_out_fraction must be in (0, 1), got {held_out_fraction}")
    with torch.inference_mode(False), torch.enable_grad():  # any caller context; inference tensors copied
        return _fit_probe(x.detach().to(torch.float64).clone(), y.detach().clone(), num_classes, l2, l2_grid,
                          held_out_fraction, max_iter, seed)


def _fit_probe(x, y, num_classes, l2, l2_grid, held_out_fraction, max_iter, seed) -> LinearProbe:
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    scores: dict[float, float] = {}
    if l2 is None:
        fit_idx, held_idx = _stratified_holdout(y, held_out_fraction, seed)
        if len(held_idx) == 0 or len(fit_idx) == 0:
            l2 = float(sorted(l2_grid)[len(l2_grid) // 2])
        else:
            for cand in l2_grid:
                w, b = _fit(z[fit_idx], y[fit_idx], num_classes, float(cand), max_iter)
                pred = (z[held_idx] @ w.T + b).argmax(1)
                scores[float(cand)] = float((pred == y[held_idx]).to(torch.float64).mean())
            l2 = max(scores, key=lambda c: (scores[c], c))
    w, b = _fit(z, y, num_classes, float(l2), max_iter)
    return LinearProbe(w, b, mean, std, float(l2), scores)
