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

import dataclasses
import math
from typing import Any, Mapping, Sequence

from trainer.config.schema import Config

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
        ValueError: ``step < 0``, ``total_steps < 1``, ``warmup_steps`` outside
            ``[0, total_steps]``, or ``min_lr_ratio`` outside [0, 1] (names the argument).
    """
    if step < 0:
        raise ValueError(f"lr_factor: step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"lr_factor: total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    t = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclasses.dataclass(frozen=True)
class Phase:
    """One period of the unfreeze timetable, from ``start_epoch`` until the next phase starts.

    Attributes:
        start_epoch: first epoch (0-based) of the phase.
        train: ``"head"`` (feature extraction), ``"all"`` (full fine-tuning) or ``int`` N: the top
            N backbone layer ids are trainable besides the head (0 = head only).
        lr_scale: lr multiplier for the backbone groups trainable in this phase; the head keeps 1.
        warmup_steps: optimizer steps of linear lr warmup for those backbone groups after the
            phase starts (0 = none).
    """

    start_epoch: int
    train: str | int
    lr_scale: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        if isinstance(self.train, bool) or not (self.train in ("head", "all") or isinstance(self.train, int)):
            raise ValueError(f"Phase.train must be 'head', 'all' or an int, got {self.train!r}")
        if isinstance(self.train, int) and self.train < 0:
            raise ValueError(f"Phase.train must be >= 0, got {self.train}")
        if self.start_epoch < 0:
            raise ValueError(f"Phase.start_epoch must be >= 0, got {self.start_epoch}")
        if not self.lr_scale > 0:
            raise ValueError(f"Phase.lr_scale must be > 0, got {self.lr_scale}")
        if self.warmup_steps < 0:
            raise ValueError(f"Phase.warmup_steps must be >= 0, got {self.warmup_steps}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints / logs)."""
        return dataclasses.asdict(self)


_PHASE_KEYS = ("start_epoch", "train", "lr_scale", "warmup_steps")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def build_phases(
    *,
    freeze: str = "backbone",
    phases: list[dict] | None = None,
    gradual_every: int = 0,
    gradual_start_epoch: int = 1,
    num_backbone_layers: int,
    epochs: int,
    unfreeze_warmup_steps: int = 0,
    unfrozen_lr_scale: float = 1.0,
) -> list[Phase]:
    """Unfreeze timetable from the ``finetune.*`` config fields.

    Modes (exactly one applies):

    * ``phases`` given: explicit list of ``{"start_epoch", "train", "lr_scale"?, "warmup_steps"?}``;
      the first must start at epoch 0, start epochs strictly increase and are ``< epochs``. An
      omitted ``lr_scale`` is ``unfrozen_lr_scale``; an omitted ``warmup_steps`` is
      ``unfreeze_warmup_steps`` (0 for a phase starting at epoch 0). Not combinable with
      ``freeze="none"`` or ``gradual_every``.
    * ``gradual_every = k > 0`` (with ``freeze="backbone"``): head only for ``gradual_start_epoch``
      epochs, then one more backbone layer id every ``k`` epochs from the top down (ULMFiT gradual
      unfreezing, Howard & Ruder 2018), ``"all"`` once every layer is unfrozen; phases that would
      start at or after ``epochs`` are dropped.
    * ``freeze="backbone"``: head only for the whole run (feature extraction).
    * ``freeze="none"``: everything trains from epoch 0 (full fine-tuning).

    Args:
        num_backbone_layers: number of backbone layer ids (``num_layers - 1`` from
            :func:`trainer.models.layers.layer_ids`).
        epochs: total epochs of the run.

    Returns:
        Phases sorted by ``start_epoch``, the first starting at 0.

    Raises:
        ValueError: naming the field, e.g. ``finetune.phases[1].train``.
    """
    if freeze not in ("backbone", "none"):
        raise ValueError(f"finetune.freeze must be 'backbone' or 'none', got {freeze!r}")
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"train.epochs must be an int >= 1, got {epochs!r}")
    if not _is_int(num_backbone_layers) or num_backbone_layers < 1:
        raise ValueError(f"num_backbone_layers must be an int >= 1, got {num_backbone_layers!r}")
    if not _is_int(gradual_every) or gradual_every < 0:
        raise ValueError(f"finetune.gradual_every must be an int >= 0, got {gradual_every!r}")
    if not _is_int(gradual_start_epoch) or gradual_start_epoch < 0:
        raise ValueError(f"finetune.gradual_start_epoch must be an int >= 0, got {gradual_start_epoch!r}")
    if not _is_int(unfreeze_warmup_steps) or unfreeze_warmup_steps < 0:
        raise ValueError(f"finetune.unfreeze_warmup_steps must be an int >= 0, got {unfreeze_warmup_steps!r}")
    if isinstance(unfrozen_lr_scale, bool) or not isinstance(unfrozen_lr_scale, (int, float)) \
            or not unfrozen_lr_scale > 0:
        raise ValueError(f"finetune.unfrozen_lr_scale must be a number > 0, got {unfrozen_lr_scale!r}")

    if phases is not None:
        if freeze == "none":
            raise ValueError("finetune.phases cannot be combined with finetune.freeze='none' "
                             "(the phases define what is frozen)")
        if gradual_every:
            raise ValueError("finetune.phases and finetune.gradual_every are exclusive: set only one")
        return _explicit_phases(phases, num_backbone_layers, epochs, unfreeze_warmup_steps, unfrozen_lr_scale)
    if freeze == "none":
        if gradual_every:
            raise ValueError("finetune.gradual_every needs finetune.freeze='backbone' (got 'none')")
        return [Phase(0, "all")]
    if not gradual_every:
        return [Phase(0, "head")]

    out = [Phase(0, "head")] if gradual_start_epoch > 0 else []
    n = 1
    while n <= num_backbone_layers:
        start = gradual_start_epoch + (n - 1) * gradual_every
        if start >= epochs:
            break
        out.append(Phase(start, "all" if n == num_backbone_layers else n, float(unfrozen_lr_scale),
                         unfreeze_warmup_steps if start > 0 else 0))
        n += 1
    if not out:  # gradual_start_epoch == 0 can not yield an empty list, kept for safety
        out = [Phase(0, "head")]
    return out


def _explicit_phases(phases, num_backbone_layers, epochs, unfreeze_warmup_steps, unfrozen_lr_scale):
    if not isinstance(phases, Sequence) or isinstance(phases, (str, bytes)) or len(phases) == 0:
        raise ValueError(f"finetune.phases must be a non-empty list of mappings, got {phases!r}")
    out: list[Phase] = []
    for i, p in enumerate(phases):
        where = f"finetune.phases[{i}]"
        if not isinstance(p, Mapping):
            raise ValueError(f"{where} must be a mapping with keys {list(_PHASE_KEYS)}, got {p!r}")
        unknown = sorted(set(p) - set(_PHASE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(_PHASE_KEYS)}")
        for key in ("start_epoch", "train"):
            if key not in p:
                raise ValueError(f"{where}.{key} is required")
        start = p["start_epoch"]
        if not _is_int(start) or start < 0:
            raise ValueError(f"{where}.start_epoch must be an int >= 0, got {start!r}")
        if i == 0 and start != 0:
            raise ValueError(f"{where}.start_epoch must be 0 (the first phase starts the run), got {start}")
        if out and start <= out[-1].start_epoch:
            raise ValueError(f"{where}.start_epoch {start} must be > finetune.phases[{i - 1}].start_epoch "
                             f"{out[-1].start_epoch}")
        if start >= epochs:
            raise ValueError(f"{where}.start_epoch {start} must be < train.epochs {epochs}")
        train = p["train"]
        if _is_int(train):
            if not 0 <= train <= num_backbone_layers:
                raise ValueError(f"{where}.train {train} must be in [0, {num_backbone_layers}] "
                                 f"(the backbone has {num_backbone_layers} layer ids)")
        elif train not in ("head", "all"):
            raise ValueError(f"{where}.train must be 'head', 'all' or an int N (top N backbone layer "
                             f"ids), got {train!r}")
        lr_scale = p.get("lr_scale", unfrozen_lr_scale)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"{where}.lr_scale must be a number > 0, got {lr_scale!r}")
        warm = p.get("warmup_steps", unfreeze_warmup_steps if start > 0 else 0)
        if not _is_int(warm) or warm < 0:
            raise ValueError(f"{where}.warmup_steps must be an int >= 0, got {warm!r}")
        out.append(Phase(start, train, float(lr_scale), warm))
    return out


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
        phase: the phase active at ``step``.
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
