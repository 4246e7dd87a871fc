"""The multi-label training loss: independent sigmoid per class, BCE-with-logits or asymmetric loss (ASL).

``logits`` are ``(B, C)``; ``targets`` are ``(B, C)`` floats in [0, 1] (0/1 label sets, or soft sets from
mixup / cutmix). Both losses average over the ``B x C`` elements, so their scale does not change with the
batch size or the class count and switching ``kind`` keeps the learning rate meaningful.

* ``bce``: ``torch.nn.functional.binary_cross_entropy_with_logits`` with optional ``pos_weight`` (the
  positive term of class c is multiplied by ``pos_weight[c]``) and optional label smoothing: targets become
  ``y * (1 - eps) + eps / 2`` (1 -> 1 - eps/2, 0 -> eps/2: each binary label moves towards 0.5).
* ``asl``: timm's ``AsymmetricLossMultiLabel`` (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label
  Classification", ICCV) with its defaults ``gamma_neg=4, gamma_pos=1, clip=0.05``, ``reduction="mean"``;
  ``pos_weight`` and label smoothing (same formula) are passed to it. A timm whose ASL lacks ``reduction``
  (it then sums) or a requested option is refused with a ValueError.

``pos_weight="auto"``: from the training split's per-class positive counts ``n_c`` and its sample count
``N``: ``w_c = (N - n_c) / n_c`` (negatives over positives, the weight that balances the two terms of
class c; ``torch.nn.BCEWithLogitsLoss`` docs), clamped to ``[1 / MAX_POS_WEIGHT, MAX_POS_WEIGHT]`` =
[0.01, 100]: a class seen in 1 of 10,000 images would otherwise weigh ~10,000 and its few samples would
dominate every gradient step. A class without positives (never a positive target, so its weight has no
effect) gets 1.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("trainer")

MULTILABEL_LOSS_KINDS = ("bce", "asl")
MAX_POS_WEIGHT = 100.0


def auto_pos_weight(class_counts: Sequence[int] | torch.Tensor, num_samples: int) -> torch.Tensor:
    """``pos_weight="auto"``: negatives over positives per class, clamped (module docstring).

    Args:
        class_counts: ``n_c``, training samples that carry class c (length C).
        num_samples: ``N``, training samples (a sample may carry several classes, or none).

    Returns:
        ``(C,) float32`` weights in [0.01, 100]; 1 for a class without positives.

    Raises:
        ValueError: empty counts, a negative count, a count above ``num_samples``, or ``num_samples < 1``.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("pos_weight=auto: class_counts is empty")
    if int(num_samples) < 1:
        raise ValueError(f"pos_weight=auto: num_samples must be >= 1, got {num_samples}")
    if bool((counts < 0).any()) or bool((counts > num_samples).any()):
        raise ValueError(f"pos_weight=auto: class counts must be in [0, num_samples={num_samples}], "
                         f"got {counts.long().tolist()[:20]}")
    w = torch.where(counts > 0, (num_samples - counts) / counts.clamp(min=1), torch.ones_like(counts))
    return w.clamp(1.0 / MAX_POS_WEIGHT, MAX_POS_WEIGHT).float()


class SmoothedBCEWithLogits(torch.nn.Module):
    """BCE-with-logits, mean over ``B x C``, with per-class ``pos_weight`` and label smoothing
    ``y * (1 - eps) + eps / 2``.

    ``forward(logits (B, C), targets (B, C) in [0, 1]) -> 0-dim float32``. Raises ValueError on shape mismatch.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"multi-label loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                             "differ in shape")
        y = targets.float()
        if self.label_smoothing:
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=self.pos_weight)


def _resolve_pos_weight(pos_weight, class_counts, num_samples) -> torch.Tensor | None:
    if pos_weight is None:
        return None
    if isinstance(pos_weight, str):
        if pos_weight != "auto":
            raise ValueError(f"pos_weight must be None, 'auto' or a (C,) tensor, got {pos_weight!r}")
        if class_counts is None or num_samples is None:
            raise ValueError("pos_weight='auto' needs the training split's class_counts and num_samples")
        return auto_pos_weight(class_counts, num_samples)
    w = torch.as_tensor(pos_weight, dtype=torch.float32).reshape(-1)
    if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"pos_weight must be finite and > 0 per class, got {w.tolist()[:20]}")
    if class_counts is not None and w.numel() != len(class_counts):
        raise ValueError(f"pos_weight has {w.numel()} values for {len(class_counts)} classes")
    return w


def build_multilabel_criterion(kind: str = "bce", pos_weight: str | torch.Tensor | Sequence[float] | None = None,
                               label_smoothing: float = 0.0, class_counts: Sequence[int] | None = None,
                               num_samples: int | None = None, *, class_names: Sequence[str] | None = None,
                               device: torch.device | str = "cpu") -> torch.nn.Module:
    """The multi-label training criterion (formulas in the module docstring).

    Args:
        kind: ``bce`` or ``asl``.
        pos_weight: None (all 1), ``"auto"`` (from ``class_counts`` / ``num_samples``) or ``(C,)`` positive weights.
        label_smoothing: ``eps`` in [0, 1).
        class_counts: training samples carrying each class (length C); needed for ``"auto"``.
        num_samples: training samples; needed for ``"auto"``.
        class_names: only to name the classes in the log line of the weights.
        device: where the weight tensor lives.

    Returns:
        ``loss(logits (B, C), targets (B, C) float in [0, 1]) -> 0-dim`` mean over the ``B x C`` elements.

    Raises:
        ValueError: unknown ``kind``, ``label_smoothing`` outside [0, 1), a bad ``pos_weight`` (see
            :func:`auto_pos_weight`), ``"auto"`` without counts, or ASL options the installed timm lacks.
    """
    if kind not in MULTILABEL_LOSS_KINDS:
        raise ValueError(f"multi-label loss kind must be one of {list(MULTILABEL_LOSS_KINDS)}, got {kind!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weight = _resolve_pos_weight(pos_weight, class_counts, num_samples)
    if weight is not None:
        names = class_names or [str(i) for i in range(weight.numel())]
        log.info("pos_weight (%s): %s", "auto" if isinstance(pos_weight, str) else "given",
                 ", ".join(f"{n}={v:.3f}" for n, v in list(zip(names, weight.tolist()))[:20]))
        weight = weight.to(device)
    if kind == "bce":
        return SmoothedBCEWithLogits(weight, label_smoothing)
    from timm.loss import AsymmetricLossMultiLabel

    params = inspect.signature(AsymmetricLossMultiLabel).parameters
    wanted = {"reduction": "mean", "smoothing": float(label_smoothing), "pos_weight": weight}
    used = {"reduction": True, "smoothing": bool(label_smoothing), "pos_weight": weight is not None}
    missing = [name for name in wanted if used[name] and name not in params]
    if missing:
        raise ValueError(f"kind='asl' with {', '.join(missing)} needs a newer timm: the installed "
                         "AsymmetricLossMultiLabel lacks it")
    return AsymmetricLossMultiLabel(**{k: v for k, v in wanted.items() if k in params}).to(device)
