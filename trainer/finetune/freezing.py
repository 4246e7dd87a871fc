"""The only module that changes ``requires_grad`` or BatchNorm mode.

A phase (:class:`trainer.finetune.schedule.Phase`) says which layer ids train. :func:`apply_phase` sets
``requires_grad`` on every parameter and marks the BatchNorm modules of frozen layers so that they
stay in eval mode (running statistics used and never updated) even after ``model.train()``: a
forward-pre-hook, registered once per BatchNorm module, sets ``module.training = False`` while the
module is marked (so between ``model.train()`` and the next forward a frozen BN's ``.training``
flag reads True; what it computes is always eval-mode). Unmarking (a later phase that unfreezes
the layer) restores normal behaviour.

DDP: DistributedDataParallel records which parameters require grad when it is constructed, so the
training loop must (re)build its DDP wrapper after every :func:`apply_phase` call. Because frozen
parameters simply have no gradient and frozen BN layers do not change their buffers, no
``find_unused_parameters`` is needed.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.finetune.schedule import Phase

__all__ = ["trainable_layer_ids", "apply_phase", "frozen_entirely", "FROZEN_BN_POLICIES", "BN_STATS_POLICIES"]

FROZEN_BN_POLICIES = ("eval", "affine")
BN_STATS_POLICIES = ("update", "frozen")
_MARK = "_trainer_bn_frozen"  # module attribute: True while the BN belongs to a frozen layer
_HOOK = "_trainer_bn_hook"  # module attribute: handle of the forward-pre-hook (registered once)


def trainable_layer_ids(phase: Phase, num_layers: int) -> set[int]:
    """Layer ids trainable in ``phase``; the head is ``num_layers - 1``.

    ``"head"`` -> ``{head}``; ``"all"`` -> ``{0 .. head}``; int N -> the top N backbone ids and
    the head, ``{num_layers - 1 - N .. head}``.

    Raises:
        ValueError: ``num_layers < 2`` or N larger than the number of backbone ids (names
            ``Phase.train``).
    """
    if num_layers < 2:
        raise ValueError(f"trainable_layer_ids: num_layers must be >= 2 (backbone + head), got {num_layers}")
    head = num_layers - 1
    if phase.train == "head":
        return {head}
    if phase.train == "all":
        return set(range(num_layers))
    n = int(phase.train)
    if not 0 <= n <= head:
        raise ValueError(f"Phase.train={n} (phase starting at epoch {phase.start_epoch}) exceeds the "
                         f"{head} backbone layer ids")
    return set(range(head - n, num_layers))


def _force_eval_pre_hook(module: nn.Module, args) -> None:
    """Forward-pre-hook: a marked (frozen) BatchNorm runs in eval mode whatever ``train()`` said."""
    if getattr(module, _MARK, False):
        module.training = False


def _module_layer(name: str, module: nn.Module, layer_of: dict[str, int]) -> int:
    """Layer id of a module: that of its own parameters, else (non-affine BN) of the parameter
    whose name shares the longest dotted prefix with the module name."""
    own = [layer_of[f"{name}.{pn}"] for pn, _ in module.named_parameters(recurse=False)]
    if own:
        return max(own)
    parts = name.split(".")
    best, best_len = None, -1
    for pname, lid in layer_of.items():
        pp = pname.split(".")
        k = 0
        while k < min(len(pp), len(parts)) and pp[k] == parts[k]:
            k += 1
        if k > best_len:
            best, best_len = lid, k
    if best is None:
        raise ValueError(f"apply_phase: no layer id found for module {name!r}")
    return best


def apply_phase(model: nn.Module, layer_of: dict[str, int], num_layers: int, phase: Phase,
                frozen_bn: str = "eval", bn_stats: str = "update") -> dict[str, Any]:
    """Freeze / unfreeze ``model`` for ``phase``; call at every phase change (and after resume).

    Sets ``requires_grad`` on every parameter (trainable iff its layer id is in
    :func:`trainable_layer_ids`) and marks every BatchNorm (``torch.nn.modules.batchnorm._BatchNorm``
    subclasses: BatchNorm1d/2d/3d, SyncBatchNorm, timm ``BatchNormAct2d``) of a frozen layer to stay
    in eval mode even after ``model.train()``.

    Args:
        model: an :class:`trainer.models.classifier.ImageClassifier` (any module whose parameter names are the
            keys of ``layer_of``).
        layer_of: ``{parameter name: layer id}`` from :func:`trainer.models.layers.layer_ids`.
        num_layers: number of layer ids (head = ``num_layers - 1``).
        phase: the active phase.
        frozen_bn: ``"eval"`` (default): BN of frozen layers fully frozen (weights and running
            stats). ``"affine"``: their weight/bias still train but running stats stay fixed (the
            modules stay in eval mode).
        bn_stats: BatchNorm of *trainable* layers: ``"update"`` (default, the usual train-mode BN:
            batch statistics, running stats updated) or ``"frozen"`` (eval mode everywhere: the
            pretrained running statistics are kept, only scale/shift train). ``frozen`` is the
            usual choice when fine-tuning with small per-rank batches, whose statistics are too noisy
            to replace the pretrained ones (as detectron2's FrozenBatchNorm; Wu & Johnson 2021,
            "Rethinking Batch in BatchNorm").

    Returns:
        Summary: ``trainable_layer_ids`` (sorted list), ``trainable_params`` / ``frozen_params``
        (element counts), ``trainable_tensors``, ``frozen_bn_modules`` (count kept in eval mode),
        ``frozen_bn`` (policy), ``backbone_frozen`` (:func:`frozen_entirely`).

    Raises:
        ValueError: unknown ``frozen_bn`` (``finetune.frozen_bn``) or ``bn_stats``
            (``finetune.bn_stats``), or ``layer_of`` not matching the model's parameters (names them).
    """
    if frozen_bn not in FROZEN_BN_POLICIES:
        raise ValueError(f"finetune.frozen_bn must be one of {FROZEN_BN_POLICIES}, got {frozen_bn!r}")
    if bn_stats not in BN_STATS_POLICIES:
        raise ValueError(f"finetune.bn_stats must be one of {BN_STATS_POLICIES}, got {bn_stats!r}")
    trainable = trainable_layer_ids(phase, num_layers)
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(layer_of))
    extra = sorted(set(layer_of) - set(named))
    if missing or extra:
        raise ValueError(f"apply_phase: layer_of does not match the model: parameters without layer id "
                         f"{missing[:10]}, unknown names {extra[:10]}")

    bn_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    bn_params = {f"{n}.{pn}" for n, m in bn_modules for pn, _ in m.named_parameters(recurse=False)}

    counts = {"trainable_params": 0, "frozen_params": 0, "trainable_tensors": 0}
    for name, p in named.items():
        train = layer_of[name] in trainable or (frozen_bn == "affine" and name in bn_params)
        p.requires_grad_(train)
        if train:
            counts["trainable_params"] += p.numel()
            counts["trainable_tensors"] += 1
        else:
            counts["frozen_params"] += p.numel()

    n_frozen_bn = 0
    for name, m in bn_modules:
        if getattr(m, _HOOK, None) is None:
            setattr(m, _HOOK, m.register_forward_pre_hook(_force_eval_pre_hook))
        frozen = bn_stats == "frozen" or _module_layer(name, m, layer_of) not in trainable
        setattr(m, _MARK, frozen)
        # take effect now, not only at the next forward: frozen -> eval; unfrozen -> follow model
        m.training = False if frozen else model.training
        n_frozen_bn += int(frozen)

    return {"trainable_layer_ids": sorted(trainable), **counts, "frozen_bn_modules": n_frozen_bn,
            "frozen_bn": frozen_bn, "bn_stats": bn_stats, "backbone_frozen": frozen_entirely(model)}


def frozen_entirely(model: nn.Module) -> bool:
    """True if no parameter of ``model.backbone`` requires grad (the loop may then run the backbone
    under ``torch.no_grad()`` and skip its backward). A model without ``backbone`` raises
    ``AttributeError``."""
    return not any(p.requires_grad for p in model.backbone.parameters())


