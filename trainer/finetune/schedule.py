"""Learning-rate schedule and unfreeze timetable (pure functions, no torch).

The optimizer is built once and never rebuilt. Every optimizer step the loop sets each group's
lr from :func:`group_lr`, so the whole "scheduler state" is the optimizer step counter (saved in
checkpoints); resuming at step ``s`` gives exactly the same lrs. Typical use::

    phases = build_phases(freeze="backbone", phases=None, gradual_every=2, gradual_start_epoch=1,
                          num_backbone_layers=num_layers - 1, epochs=10)
    i = phase_index_at(phases, epoch)
    phase_start_step = phases[i].start_epoch * steps_per_epoch
    for g in optimizer.param_groups:
        g["lr"] = group_lr(base_lr, g["lr_scale"], step, total_steps, warmup_steps, phases[i],
                           phase_start_step, min_lr_ratio, is_head=g["layer_id"] == num_layers - 1)
"""

from __future__ import annotations

import math
from typing import Sequence

from trainer.config.schema import Config, ConfigError, Phase

__all__ = ["Phase", "lr_factor", "build_phases", "phase_index_at", "group_lr"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, *, min_lr_ratio: float = 0.0) -> float:
    """Global lr multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    * ``step < warmup_steps``: ``(step + 1) / warmup_steps`` (so the first step already moves and
      step ``warmup_steps - 1`` is at 1.0; linear warmup as in Goyal et al. 2017).
    * afterwards: ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * t))`` with
      ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1]: the cosine
      annealing of SGDR (Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm
      Restarts", eq. 5) without restarts. Steps ``>= total_steps`` stay at ``min_lr_ratio``.

    Returns:
        A factor in ``[min_lr_ratio, 1]`` (or below ``min_lr_ratio`` during warmup), unitless.

    Raises:
        ValueError: ``step < 0``, ``total_steps < 1`` or ``min_lr_ratio`` outside [0, 1] (names the argument).
        ConfigError: ``warmup_steps`` outside ``[0, total_steps]`` (names ``optim.warmup_steps``).
    """
    if step < 0:
        raise ValueError(f"lr_factor: step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"lr_factor: total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"optim.warmup_steps: {warmup_steps} is more than the run's {total_steps} optimizer "
                          "steps (allowed: [0, total steps])")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr_factor: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    t = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_phases(
    *,
    freeze: str = "backbone",
    phases: Sequence[Phase] | None = None,
    gradual_every: int = 0,
    gradual_start_epoch: int = 1,
    num_backbone_layers: int,
    epochs: int,
    unfreeze_warmup_steps: int = 0,
    unfrozen_lr_scale: float = 1.0,
) -> list[Phase]:
    """Unfreeze timetable from the ``finetune.*`` config fields (checked by ``FinetuneConfig`` itself).

    Modes (exactly one applies):

    * ``phases`` given: the explicit :class:`~trainer.config.sections.finetune.Phase` list (first at epoch 0, start
      epochs increasing and ``< epochs``: the config checks that). An omitted (None) ``lr_scale`` becomes
      ``unfrozen_lr_scale``; an omitted ``warmup_steps`` becomes ``unfreeze_warmup_steps`` (0 for the
      phase starting at epoch 0).
    * ``gradual_every = k > 0`` (with ``freeze="backbone"``): head only for ``gradual_start_epoch``
      epochs, then one more backbone layer id every ``k`` epochs from the top down (ULMFiT gradual
      unfreezing, Howard & Ruder 2018), ``"all"`` once every layer is unfrozen; phases that would
      start at or after ``epochs`` are dropped.
    * ``freeze="backbone"``: head only for the whole run (feature extraction).
    * ``freeze="none"``: everything trains from epoch 0 (full fine-tuning).

    Args:
        num_backbone_layers: number of backbone layer ids (``num_layers - 1`` from
            :func:`trainer.models.layers.layer_ids`), >= 1.
        epochs: total epochs of the run.

    Returns:
        Phases sorted by ``start_epoch``, the first starting at 0, every field resolved (no None).

    Raises:
        ConfigError: a phase's ``train`` N exceeds the backbone's layer ids (names
            ``finetune.phases[i].train``; only known once the model is built).
    """
    if phases is not None:
        out = []
        for i, p in enumerate(phases):
            if isinstance(p.train, int) and p.train > num_backbone_layers:
                raise ConfigError(f"finetune.phases[{i}].train {p.train} must be in [0, {num_backbone_layers}] "
                                  f"(the backbone has {num_backbone_layers} layer ids)")
            warm = p.warmup_steps if p.warmup_steps is not None else \
                (unfreeze_warmup_steps if p.start_epoch > 0 else 0)
            lr_scale = p.lr_scale if p.lr_scale is not None else unfrozen_lr_scale
            out.append(Phase(p.start_epoch, p.train, float(lr_scale), warm))
        return out
    if freeze == "none":
        return [Phase(0, "all", 1.0, 0)]
    if not gradual_every:
        return [Phase(0, "head", 1.0, 0)]

    out = [Phase(0, "head", 1.0, 0)] if gradual_start_epoch > 0 else []
    for n in range(1, num_backbone_layers + 1):
        start = gradual_start_epoch + (n - 1) * gradual_every
        if start >= epochs:
            break
        out.append(Phase(start, "all" if n == num_backbone_layers else n, float(unfrozen_lr_scale),
                         unfreeze_warmup_steps if start > 0 else 0))
    return out or [Phase(0, "head", 1.0, 0)]


def phase_index_at(phases: Sequence[Phase], epoch: int) -> int:
    """Index of the phase active at ``epoch`` (the last one with ``start_epoch <= epoch``).

    Raises:
        ValueError: empty ``phases``, ``epoch < 0`` or a first phase not starting at 0.
    """
    if not phases:
        raise ValueError("phase_index_at: empty phase list")
    if epoch < 0:
        raise ValueError(f"phase_index_at: epoch must be >= 0, got {epoch}")
    if phases[0].start_epoch != 0:
        raise ValueError(f"phase_index_at: first phase starts at epoch {phases[0].start_epoch}, not 0")
    idx = 0
    for i, p in enumerate(phases):
        if p.start_epoch <= epoch:
            idx = i
    return idx


def group_lr(base_lr: float, group_lr_scale: float, step: int, total_steps: int, warmup_steps: int,
             phase: Phase, phase_start_step: int, min_lr_ratio: float = 0.0, *, is_head: bool) -> float:
    """Learning rate of one optimizer group at optimizer step ``step``.

    ``base_lr * lr_factor(step, ...) * group_lr_scale`` and, for backbone groups
    (``is_head=False``), ``* phase.lr_scale * min(1, (step - phase_start_step + 1) /
    phase.warmup_steps)`` (linear re-warmup after an unfreeze; omitted when ``warmup_steps == 0``).
    The head group keeps scale 1 and no re-warmup. For groups frozen in ``phase`` the value is
    irrelevant (they get no gradient).

    Args:
        base_lr: peak lr (``optim.lr``), e.g. 1e-3.
        group_lr_scale: the group's ``lr_scale`` from :func:`trainer.finetune.param_groups.build_param_groups`.
        step: optimizer step (0-based, global over the run).
        total_steps, warmup_steps, min_lr_ratio: see :func:`lr_factor`.
        phase: the phase active at ``step`` (resolved, from :func:`build_phases`).
        phase_start_step: optimizer step at which ``phase`` began (``start_epoch * steps_per_epoch``).
        is_head: whether the group is the head (layer id ``num_layers - 1``).

    Raises:
        ValueError: ``step < phase_start_step`` or the errors of :func:`lr_factor`.
    """
    if step < phase_start_step:
        raise ValueError(f"group_lr: step {step} is before the phase start step {phase_start_step}")
    lr = base_lr * lr_factor(step, total_steps, warmup_steps, min_lr_ratio=min_lr_ratio) * group_lr_scale
    if is_head:
        return lr
    lr *= phase.lr_scale
    if phase.warmup_steps > 0:
        lr *= min(1.0, (step - phase_start_step + 1) / phase.warmup_steps)
    return lr


def build_phases_for(cfg: Config, num_layers: int):
    """The unfreeze timetable of ``cfg`` (``finetune`` section) for a model with ``num_layers`` layer ids."""
    f = cfg.finetune
    return build_phases(freeze=f.freeze, phases=f.phases, gradual_every=f.gradual_every,
                        gradual_start_epoch=f.gradual_start_epoch, num_backbone_layers=num_layers - 1,
                        epochs=cfg.train.epochs, unfreeze_warmup_steps=f.unfreeze_warmup_steps,
                        unfrozen_lr_scale=f.unfrozen_lr_scale)
