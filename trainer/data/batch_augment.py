"""On-device batch augmentation of the training step: mixup / cutmix and random erasing (timm).

These act on a whole micro-batch on the accelerator's device: the uint8 images are normalised first
(the model's own ``ImageClassifier.normalize``), then erased / mixed, before the forward pass, as timm's
training script does
(its ``PrefetchLoader`` erases on the device; ``Mixup`` mixes the device batch):

* random erasing (``data.random_erasing = p``): ``timm.data.RandomErasing(p, mode="pixel")``, per
  image one rectangle of 2-33% of the area and aspect ratio 0.3-3.3 filled with per-pixel N(0, 1)
  noise in normalised units (Zhong et al. 2020, "Random Erasing Data Augmentation", AAAI);
* mixup / cutmix (``data.mixup_alpha``, ``data.cutmix_alpha``): ``timm.data.Mixup`` in ``batch``
  mode: one ``lam ~ Beta(alpha, alpha)`` per micro-batch, the batch mixed with its own reverse
  (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"; Yun et al. 2019, "CutMix"); the
  labels become soft targets ``(B, C)`` with ``optim.label_smoothing`` folded in, and the loss is
  :class:`timm.loss.SoftTargetCrossEntropy` (see :func:`trainer.finetune.losses.build_criterion`).
  Multi-label (``data.task: multilabel``, targets ``(B, C)`` 0/1 label sets): timm's ``Mixup(multi_label=True)``
  mixes the label sets themselves, ``t_i = lam y_i + (1 - lam) y_{B-1-i}`` per class (a label present in both
  images stays 1, in one of them becomes ``lam`` or ``1 - lam``; for cutmix ``lam`` is the pasted area's
  complement), without smoothing: the BCE / ASL loss smooths each label itself (smoothing and mixing commute).

Random draws: timm's Mixup draws from NumPy's global RNG and RandomErasing from Python's ``random``
and torch's global RNG; all three are saved per rank in ``last.pt`` (``trainer.checkpoint.state.rng_state``).
"""

from __future__ import annotations

import torch

__all__ = ["BatchAugment", "build_batch_augment"]


class BatchAugment:
    """``(images (B, 3, S, S) uint8 or normalised float32, labels (B,) int64) -> (images float32, targets)``.

    ``targets`` are the labels unchanged when mixing is off, else ``(B, C) float32`` soft targets. With
    ``multilabel`` the labels are ``(B, C)`` 0/1 label sets and mixing mixes the sets (module docstring).

    Args:
        num_classes: C.
        random_erasing: probability per image (0: off).
        mixup_alpha, cutmix_alpha: Beta parameters (0: that one off).
        mixup_prob: probability that a batch is mixed; mixup_switch_prob: cutmix instead of mixup.
        label_smoothing: folded into the soft targets (only used when mixing).
        device: where erasing noise is drawn (the batch's device).
        normalize: ``(B, 3, S, S) uint8 -> normalised float32`` (the model's ``normalize``); uint8
            batches are passed through it first.
        multilabel: labels are ``(B, C)`` label sets (``data.task: multilabel``); ``label_smoothing`` is then
            not folded in (the multi-label loss applies it).

    Raises:
        ValueError: negative alphas or probabilities outside [0, 1] (named), or multi-label mixing with a
            timm whose ``Mixup`` lacks ``multi_label``.
    """

    def __init__(self, num_classes: int, *, random_erasing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 label_smoothing: float = 0.0, device: torch.device | str = "cpu", normalize=None,
                 multilabel: bool = False):
        for name, v in (("random_erasing", random_erasing), ("mixup_prob", mixup_prob),
                        ("mixup_switch_prob", mixup_switch_prob)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {v}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"data.mixup_alpha / cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        self.erase = self.mix = None
        self.normalize = normalize
        if random_erasing > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(probability=random_erasing, mode="pixel", device=str(device))
        if mixup_alpha > 0 or cutmix_alpha > 0:
            import inspect

            from timm.data import Mixup
            extra = {}
            if multilabel:
                if "multi_label" not in inspect.signature(Mixup).parameters:
                    raise ValueError("data.mixup_alpha / cutmix_alpha with data.task=multilabel need a timm whose "
                                     "Mixup has multi_label (a newer timm)")
                extra, label_smoothing = {"multi_label": True}, 0.0
            self.mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                             switch_prob=mixup_switch_prob, mode="batch", label_smoothing=label_smoothing,
                             num_classes=num_classes, **extra)

    @property
    def soft_targets(self) -> bool:
        """Whether :meth:`__call__` returns ``(B, C)`` soft targets (mixing on)."""
        return self.mix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one normalised micro-batch in place where the library does (erasing, cutmix).

        Raises:
            ValueError: mixing an odd-sized batch (pairs are formed with the batch's reverse).
        """
        if images.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("BatchAugment: uint8 images need a normalize function")
            images = self.normalize(images)
        if self.erase is not None:
            images = self.erase(images)
        if self.mix is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix need an even micro-batch, got {images.shape[0]} images")
            images, labels = self.mix(images, labels)
        return images, labels


def build_batch_augment(data_cfg, *, num_classes: int, label_smoothing: float, device: torch.device | str,
                        normalize=None) -> BatchAugment | None:
    """The run's :class:`BatchAugment` from ``data.*`` (None when erasing and mixing are off or
    ``data.augment`` is ``none``); ``data.task: multilabel`` mixes label sets."""
    d = data_cfg
    if d.augment == "none" or (d.random_erasing <= 0 and d.mixup_alpha <= 0 and d.cutmix_alpha <= 0):
        return None
    return BatchAugment(num_classes, random_erasing=d.random_erasing, mixup_alpha=d.mixup_alpha,
                        cutmix_alpha=d.cutmix_alpha, mixup_prob=d.mixup_prob,
                        mixup_switch_prob=d.mixup_switch_prob, label_smoothing=label_smoothing, device=device,
                        normalize=normalize, multilabel=d.task == "multilabel")
