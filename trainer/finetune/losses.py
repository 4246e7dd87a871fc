"""The training loss: cross-entropy with optional label smoothing and per-class weights against imbalance.

Class weights come from the training split's per-class sample counts ``n_c`` stored with the shards
(``dataset.json`` -> ``DatasetMeta.splits["train"].class_counts``), so every rank computes the same
weights without reading any data. ``N = sum_c n_c`` and ``C`` = number of classes:

* ``none``: every class weighs 1 (plain cross-entropy).
* ``inverse``: inverse frequency, ``w_c = N / (C * n_c)`` (scikit-learn's ``class_weight="balanced"``;
  the sample-weighted mean weight over the training set is 1).
* ``effective``: inverse *effective number of samples*, ``E_c = (1 - beta ** n_c) / (1 - beta)``,
  ``w_c = C * (1 / E_c) / sum_k (1 / E_k)`` (Cui et al. 2019, "Class-Balanced Loss Based on Effective
  Number of Samples", CVPR, eq. 3 and its normalisation to ``sum_c w_c = C``). ``beta = 0`` gives equal
  weights, ``beta -> 1`` approaches inverse frequency; the paper uses 0.9 - 0.9999.

A class with no training sample gets weight 0 (it never occurs as a target in training; a warning
names it). The weights go into ``torch.nn.CrossEntropyLoss(weight=...)``, whose ``mean`` reduction
divides by the summed weights of the micro-batch's targets (``sum_i w_{y_i} l_i / sum_i w_{y_i}``).
Validation loss (``val/loss``) stays unweighted, so runs with and without weights compare directly.

Multi-label runs (``data.task: multilabel``) get the sigmoid loss of :mod:`trainer.finetune.multilabel_loss`
instead (``optim.multilabel_loss``, ``optim.pos_weight``, ``optim.label_smoothing``): :func:`build_criterion`
dispatches on the task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from trainer.config.fields import ConfigError

log = logging.getLogger("trainer")

CLASS_WEIGHT_KINDS = ("none", "inverse", "effective")


def class_weights(class_counts: Sequence[int], kind: str = "inverse", *, beta: float = 0.999,
                  class_names: Sequence[str] | None = None) -> torch.Tensor | None:
    """Per-class loss weights from training sample counts (formulas in the module docstring).

    Args:
        class_counts: ``n_c``, training samples of each class (length C, label order), e.g. ``[120, 10]``.
        kind: ``none``, ``inverse`` or ``effective``.
        beta: ``effective`` only, in [0, 1) (``optim.class_weights_beta``, range checked by the config).
        class_names: only to name classes without samples in the warning.

    Returns:
        ``(C,) float32`` weights (0 for a class without samples), or None for ``kind="none"``.

    Raises:
        ValueError: unknown ``kind``, a negative count, or no sample at all.
    """
    if kind not in CLASS_WEIGHT_KINDS:
        raise ValueError(f"class_weights: kind must be one of {list(CLASS_WEIGHT_KINDS)}, got {kind!r}")
    if kind == "none":
        return None
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_weights: class_counts must be a non-empty list, got {list(class_counts)}")
    if bool((counts < 0).any()):
        raise ValueError(f"class_weights: negative class count in {counts.long().tolist()}")
    present = counts > 0
    if not bool(present.any()):
        raise ValueError("class_weights: the training split has no samples (all class counts are 0)")
    if not bool(present.all()):
        missing = [(class_names[i] if class_names else str(i)) for i in torch.nonzero(~present).flatten().tolist()]
        log.warning("class_weights: %d class(es) without training samples get weight 0: %s",
                    len(missing), missing[:20])
    c = counts.numel()
    w = torch.zeros_like(counts)
    if kind == "inverse":
        w[present] = counts.sum() / (c * counts[present])
    else:
        effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts[present])) / (1.0 - beta)
        inv = 1.0 / effective
        w[present] = inv * c / inv.sum()
    return w.float()


def build_criterion(optim_cfg, class_counts: Sequence[int] | None, *, class_names: Sequence[str] | None = None,
                    device: torch.device | str = "cpu", soft_targets: bool = False, multilabel: bool = False,
                    num_samples: int | None = None) -> torch.nn.Module:
    """The training criterion of a run: cross-entropy with ``optim.label_smoothing`` and ``optim.class_weights``,
    or with ``multilabel`` (``data.task: multilabel``) the sigmoid loss of :func:`build_multilabel_criterion`.

    With ``soft_targets`` (mixup / cutmix on, :mod:`trainer.data.batch_augment`) it is timm's
    ``SoftTargetCrossEntropy``, ``mean_i sum_c -t_ic log softmax(z_i)_c`` on ``(B, C)`` targets that
    already carry the label smoothing; class weights are refused by the config check then.

    Multi-label: ``optim.multilabel_loss`` (``bce`` / ``asl``) with ``optim.pos_weight`` (``auto``: from
    ``class_counts`` = training images carrying each class and ``num_samples`` = training images) and
    ``optim.label_smoothing`` (each binary label towards 0.5); soft targets from mixup / cutmix need nothing
    else (BCE takes targets in [0, 1]). ``optim.class_weights`` is refused there (``pos_weight`` is its analogue).

    Args:
        optim_cfg: :class:`trainer.config.sections.optim.OptimConfig` (``label_smoothing``, ``class_weights``,
            ``class_weights_beta``, ``multilabel_loss``, ``pos_weight``).
        class_counts: training samples per class (needed unless ``class_weights`` / ``pos_weight`` is ``none``).
        device: where the weight tensor lives (the accelerator's device).
        multilabel: the run's ``data.task`` is ``multilabel``. num_samples: training samples (``pos_weight: auto``).

    Returns:
        ``loss(logits (B, C) float32, labels (B,) int64) -> 0-dim`` weighted mean over the batch; multi-label:
        ``loss(logits (B, C), targets (B, C) float in [0, 1]) -> 0-dim`` mean over the ``B x C`` elements.

    Raises:
        ConfigError: class weights or ``pos_weight: auto`` requested without counts, class weights with multilabel.
        ValueError: a count list of the wrong length is caught later by the loss itself (shape error naming
            both sizes).
    """
    if multilabel:
        return _multilabel_criterion(optim_cfg, class_counts, num_samples, class_names=class_names, device=device)
    if soft_targets:
        if optim_cfg.class_weights != "none":
            raise ValueError("optim.class_weights does not combine with mixup/cutmix (soft targets)")
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()
    weight = None
    if optim_cfg.class_weights != "none":
        if class_counts is None:
            raise ConfigError(f"optim.class_weights={optim_cfg.class_weights} needs the training split's "
                             "class_counts in dataset.json")
        weight = class_weights(class_counts, optim_cfg.class_weights, beta=optim_cfg.class_weights_beta,
                               class_names=class_names)
        names = class_names or [str(i) for i in range(len(weight))]
        log.info("class weights (%s): %s", optim_cfg.class_weights,
                 ", ".join(f"{n}={v:.3f}" for n, v in list(zip(names, weight.tolist()))[:20]))
        weight = weight.to(device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=optim_cfg.label_smoothing)


def _multilabel_criterion(optim_cfg, class_counts, num_samples, *, class_names, device) -> torch.nn.Module:
    """:func:`build_criterion` for ``data.task: multilabel`` (see there)."""
    from trainer.finetune.multilabel_loss import build_multilabel_criterion

    if optim_cfg.class_weights != "none":
        raise ConfigError(f"optim.class_weights={optim_cfg.class_weights} is for single-label runs; with "
                          "data.task=multilabel use optim.pos_weight=auto")
    auto = getattr(optim_cfg, "pos_weight", "none") == "auto"
    if auto and (class_counts is None or not num_samples):
        raise ConfigError("optim.pos_weight=auto needs the training split's class_counts and num_samples in "
                          "dataset.json")
    try:
        return build_multilabel_criterion(getattr(optim_cfg, "multilabel_loss", "bce"),
                                          "auto" if auto else None, optim_cfg.label_smoothing,
                                          class_counts=class_counts if auto else None,
                                          num_samples=num_samples if auto else None, class_names=class_names,
                                          device=device)
    except ValueError as e:  # counts that do not fit, an ASL option the installed timm lacks
        raise ConfigError(f"optim.multilabel_loss / optim.pos_weight: {e}") from None
