"""Model EMA: an exponential moving average of the weights, evaluated beside them (timm ``ModelEmaV3``).

``train.ema_decay = d`` keeps ``ema = decay_t * ema + (1 - decay_t) * weights`` after every optimizer
step, over all floating-point parameters and buffers (BatchNorm running statistics included), with
timm's warm-up ``decay_t = min(d, 1 - (1 + t) ** (-2/3))`` at step ``t`` so that short fine-tuning runs
are not dominated by the initial weights (Polyak & Juditsky 1992; the EMA of timm's ImageNet recipes).
Every rank holds and updates its own copy of the (identical) DDP weights, so the copies stay equal.

The trainer evaluates the EMA weights after each epoch as ``val_ema/*`` beside ``val/*``;
:func:`choose` says which of the two evaluations goes to ``best.pt`` and early stopping.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ModelEma", "choose"]


class ModelEma:
    """EMA copy of ``model`` (``timm.utils.ModelEmaV3`` with decay warm-up).

    Args:
        model: the plain (unwrapped) model, already on its device.
        decay: the largest decay, in (0, 1).

    Raises:
        ValueError: ``decay`` outside (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        from timm.utils import ModelEmaV3

        self.impl = ModelEmaV3(model, decay=decay, use_warmup=True)
        self.impl.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode, no gradients), same class and state-dict keys as ``model``."""
        return self.impl.module

    def update(self, model: nn.Module, step: int) -> None:
        """Blend the weights of ``model`` (plain, unwrapped) in after optimizer step ``step`` (1-based)."""
        self.impl.update(model, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights (for ``last.pt``)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output (strict: same keys as the model)."""
        self.module.load_state_dict(state)

    def reset_to(self, model: nn.Module) -> None:
        """Copy ``model``'s current weights into the EMA (after a linear-probe head was written)."""
        self.module.load_state_dict(model.state_dict())


def choose(raw: dict, ema: dict | None, monitor: str, mode: str) -> tuple[str, dict]:
    """Which evaluation selects ``best.pt``: ``("raw", raw)`` or ``("ema", ema as val/* keys)``.

    Args:
        raw: the raw weights' ``val/*`` metrics; ema: the EMA weights' metrics under the same
            ``val/*`` names (or None: no EMA).
        monitor: the monitored key (``train.early_stopping.monitor``); mode: ``max`` or ``min``.

    Returns:
        ``(which, metrics)``; ties go to the raw weights.
    """
    if ema is None or monitor not in ema:
        return "raw", raw
    better = ema[monitor] > raw[monitor] if mode == "max" else ema[monitor] < raw[monitor]
    return ("ema", ema) if better else ("raw", raw)
