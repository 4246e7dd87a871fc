"""``optim``: optimizer, learning-rate schedule and loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from trainer.config.fields import ConfigError, Section, num


@dataclass
class OptimConfig(Section):
    """Optimizer, learning-rate schedule and loss."""

    _where: ClassVar[str] = "optim"

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer (``torch.optim.AdamW`` or ``torch.optim.SGD`` with Nesterov momentum)."""
    lr: float = num(1e-3, gt=0)
    """Peak learning rate of the head (per-group scales multiply it)."""
    weight_decay: float = num(0.01, ge=0)
    """Decoupled weight decay; norms and biases get none."""
    momentum: float = num(0.9, ge=0, lt=1)
    """SGD momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas: two numbers in [0, 1)."""
    warmup_steps: int = num(0, ge=0)
    """Linear warmup from 0 to ``lr`` over this many optimizer steps, then cosine decay."""
    min_lr_ratio: float = num(0.0, ge=0, le=1)
    """Floor of the cosine decay as a fraction of the peak lr."""
    label_smoothing: float = num(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy loss (Szegedy et al. 2016). With ``data.task: multilabel`` it smooths
    each binary label of the BCE / ASL loss towards 0.5: ``y (1 - eps) + eps / 2``."""
    grad_clip: Optional[float] = num(None, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    class_weights: Literal["none", "inverse", "effective"] = "none"
    """Per-class weights of the training loss, from the training split's class counts in ``dataset.json``
    (against class imbalance; see ``trainer/finetune/losses.py``): ``none``; ``inverse``: ``w_c = N / (C n_c)``
    (inverse frequency); ``effective``: ``w_c`` proportional to ``(1 - beta) / (1 - beta ** n_c)``, the
    inverse effective number of samples (Cui et al. 2019), scaled to sum to C. Validation loss stays unweighted."""
    class_weights_beta: float = num(0.999, ge=0, lt=1)
    """``beta`` of ``class_weights: effective`` (0: no re-weighting; towards 1: inverse frequency)."""
    multilabel_loss: Literal["bce", "asl"] = "bce"
    """Loss of ``data.task: multilabel`` runs (one sigmoid per class; ``trainer/finetune/multilabel_loss.py``):
    ``bce``: binary cross-entropy with logits, mean over images x classes; ``asl``: timm's
    ``AsymmetricLossMultiLabel`` (Ridnik et al. 2021; gamma_neg 4, gamma_pos 1, clip 0.05), same mean.
    Ignored by single-label runs."""
    pos_weight: Literal["none", "auto"] = "none"
    """Weight of the positive term per class in the multi-label loss (``data.task: multilabel`` only):
    ``none``: 1; ``auto``: ``(N - n_c) / n_c`` from the training split's image count N and the images n_c
    carrying class c (``dataset.json``), clamped to [0.01, 100]. Single-label runs use ``class_weights``."""

    def _check(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: {self.betas} is not allowed (allowed: two numbers in [0, 1))")
