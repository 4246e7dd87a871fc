"""``finetune``: what trains when (strategy, freezing, the unfreeze timetable of :class:`Phase` items,
layer-wise lr, BatchNorm handling)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from trainer.config.fields import ConfigError, Section, num


@dataclass(frozen=True)
class Phase(Section):
    """One period of the unfreeze timetable (``finetune.phases[i]``), from ``start_epoch`` until the next
    phase starts. ``lr_scale`` / ``warmup_steps`` left null take the section's ``unfrozen_lr_scale`` /
    ``unfreeze_warmup_steps`` (warmup 0 for the phase at epoch 0); ``trainer.finetune.schedule.build_phases``
    resolves them."""

    _where: ClassVar[str] = "finetune.phases[i]"

    start_epoch: int = num(ge=0)
    """First epoch (0-based) of the phase."""
    train: Union[Literal["head", "all"], int] = num(ge=0)
    """``head`` (feature extraction), ``all`` (full fine-tuning) or N: the top N backbone layer ids train
    besides the head (0 = head only)."""
    lr_scale: Optional[float] = num(None, gt=0)
    """lr multiplier for the backbone groups trainable in this phase (the head keeps 1)."""
    warmup_steps: Optional[int] = num(None, ge=0)
    """Optimizer steps of linear lr warmup of those backbone groups after the phase starts (0 = none)."""

    def to_dict(self) -> dict:
        """Plain dict (for checkpoints / logs)."""
        return dataclasses.asdict(self)


@dataclass
class FinetuneConfig(Section):
    """What trains when: feature extraction, fine-tuning, partial / gradual unfreezing, layer-wise lr."""

    _where: ClassVar[str] = "finetune"

    strategy: Literal["auto", "epochs", "linear_probe", "lp_ft"] = "epochs"
    """``auto`` (the default when no config file is given; needs ``train.time_budget`` or a Slurm job end
    time): the planner (``trainer/planner/``) measures the data and this machine and chooses the backbone, the
    input size, the strategy below and the number of steps that fit the budget; the plan is printed and kept
    in ``plan.json``. ``epochs``: train for ``train.epochs`` with the timetable below (``freeze``, ``phases``,
    ``gradual_every``). ``linear_probe``: frozen backbone, features of the train and val splits computed
    once (eval transform), a multinomial logistic-regression head solved to convergence by full-batch
    L-BFGS with the L2 strength chosen on val from ``lp_l2_grid`` (Kornblith et al. 2019), written into
    ``best.pt``; no epochs run. ``lp_ft``: that linear probe first, then ``train.epochs`` of the timetable
    below starting from its head (LP-FT, Kumar et al. 2022; use with ``freeze: none``)."""
    lp_l2_grid: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0])
    """Linear probe: L2 strengths ``lambda`` > 0 tried (loss = mean cross-entropy + lambda/2 * ||W||^2 on
    standardised features). The one with the best val top-1 (ties: val loss) is kept. The default spans
    weak (large data) to strong (a few hundred images: ants/bees picks 10)."""
    lp_max_samples: Optional[int] = num(None, ge=100)
    """Linear probe: fit on about this many training images at most, every k-th of each training shard (all
    classes keep their share; the others are not decoded); null: the whole training split. Val is always
    whole. The planner sets 4,000 on large data: the probe is the baseline and the head fine-tuning starts
    from, and its feature pass over every image would cost a fifth of a 15-minute budget (EuroSAT, 128 px)."""
    lp_max_iter: int = num(200, ge=10, le=10000)
    """Linear probe: L-BFGS iterations per L2 value (warm-started along the grid)."""
    freeze: Literal["backbone", "none"] = "backbone"
    """``backbone``: feature extraction (only the head trains); ``none``: fine-tune everything.
    Ignored when ``phases`` or ``gradual_every`` is set."""
    phases: Optional[list[Phase]] = None
    """Unfreeze timetable, e.g. ``[{start_epoch: 0, train: head}, {start_epoch: 2, train: 2, lr_scale: 0.1},
    {start_epoch: 4, train: all}]``; ``train`` is ``head``, ``all`` or the number of top backbone layers.
    The first phase starts at epoch 0, start epochs increase and stay below ``train.epochs``."""
    gradual_every: int = num(0, ge=0)
    """> 0: gradual unfreezing, one more backbone layer (top down) every this many epochs."""
    gradual_start_epoch: int = num(1, ge=0)
    """Gradual mode: epochs of head-only training before the first unfreeze."""
    layer_decay: Optional[float] = num(None, gt=0, le=1)
    """Layer-wise lr decay: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - 1 - i)`` (BEiT)."""
    layer_lr_scale: Optional[dict[int, float]] = None
    """Explicit lr multiplier (>= 0) per layer id (discriminative learning rates, ULMFiT), e.g. ``{0: 0.1,
    3: 0.5}``; ids not listed keep 1; excludes ``layer_decay``."""
    frozen_bn: Literal["eval", "affine"] = "eval"
    """BatchNorm in frozen layers: ``eval`` (fixed statistics and affine) or ``affine`` (statistics
    fixed, scale/shift train)."""
    bn_stats: Literal["update", "frozen"] = "update"
    """BatchNorm of *trainable* layers: ``update`` (batch statistics, running stats updated) or
    ``frozen`` (pretrained running statistics kept, only scale/shift train; better with small
    per-rank batches)."""
    unfreeze_warmup_steps: int = num(0, ge=0)
    """Linear lr warmup of newly unfrozen layers after each unfreeze (optimizer steps)."""
    unfrozen_lr_scale: float = num(1.0, gt=0)
    """Default lr multiplier for unfrozen backbone layers in gradual mode (phases set their own)."""
    l2_sp: Optional[float] = num(None, gt=0, le=1e4)
    """L2-SP strength (Li et al. 2018), decoupled: after each step every trainable backbone weight moves
    ``lr x l2_sp`` of its distance back toward its pretrained value, instead of weight decay toward zero
    (``trainer.finetune.l2sp``); a weight then stays within about ``1 / l2_sp`` of its pretrained value.
    null: off. 1000 in ``configs/ants_bees_lite0_finetune.yaml`` (244 training images)."""

    def _check(self) -> None:
        if not self.lp_l2_grid or any(not v > 0 for v in self.lp_l2_grid):
            raise ConfigError(f"finetune.lp_l2_grid: {self.lp_l2_grid} is not allowed (allowed: a non-empty list "
                              "of numbers > 0)")
        if self.strategy == "linear_probe" and (self.freeze != "backbone" or self.phases or self.gradual_every):
            raise ConfigError("finetune.strategy=linear_probe trains only the head on a frozen backbone: leave "
                              "finetune.freeze=backbone and finetune.phases/gradual_every unset")
        if self.layer_decay is not None and self.layer_lr_scale is not None:
            raise ConfigError("finetune.layer_decay and finetune.layer_lr_scale are mutually exclusive: set only one")
        for lid, s in (self.layer_lr_scale or {}).items():
            if lid < 0 or not s >= 0:
                raise ConfigError(f"finetune.layer_lr_scale: {{{lid}: {s}}} is not allowed "
                                  "(allowed: layer id >= 0 -> scale >= 0)")
        if self.gradual_every and self.freeze == "none":
            raise ConfigError("finetune.gradual_every needs finetune.freeze='backbone' (got 'none')")
        if self.phases is None:
            return
        if self.freeze == "none":
            raise ConfigError("finetune.phases cannot be combined with finetune.freeze='none' "
                              "(the phases define what is frozen)")
        if self.gradual_every:
            raise ConfigError("finetune.phases and finetune.gradual_every are exclusive: set only one")
        if not self.phases:
            raise ConfigError("finetune.phases: [] is not allowed (allowed: a non-empty list of phases or null)")
        if self.phases[0].start_epoch != 0:
            raise ConfigError(f"finetune.phases[0].start_epoch must be 0 (the first phase starts the run), "
                              f"got {self.phases[0].start_epoch}")
        for i in range(1, len(self.phases)):
            if self.phases[i].start_epoch <= self.phases[i - 1].start_epoch:
                raise ConfigError(f"finetune.phases[{i}].start_epoch {self.phases[i].start_epoch} must be > "
                                  f"finetune.phases[{i - 1}].start_epoch {self.phases[i - 1].start_epoch}")
