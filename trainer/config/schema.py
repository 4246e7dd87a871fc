"""Run configuration: dataclasses with documented defaults, YAML files that hold only differences,
command-line overrides, and errors that name the offending key.

A config is built in three layers, later ones winning:

1. the defaults below (every field documented in its class);
2. a YAML file (``--config configs/x.yaml``) with the same section layout, e.g.::

       data:
         root: ../shared/data/hymenoptera_data
       optim:
         lr: 3.0e-3

3. overrides ``--section.key=value`` from the command line (parsed by ``fire``, so ``--optim.lr=3e-4``,
   ``--finetune.phases='[{start_epoch: 0, train: head}]'`` work).

Every section (one module each in ``trainer/config/sections/``) validates itself when it is built
(``__post_init__``, see ``trainer/config/fields.py``): each field is converted by its type and checked
against its valid range (declared with ``num(default, ge=.., gt=.., le=.., lt=..)``) or set (a
``Literal``), then ``_check`` applies rules between fields; :class:`Config` (here) checks the rules
between sections.
Unknown sections or keys, values of the wrong type or out of range raise :class:`ConfigError` naming the
key (``optim.lr: expected float, got str 'fast'``, ``optim.grad_clip: -1.0 is not allowed (allowed: > 0 or
null)``). ``python trainer/main.py --help`` lists every field with type, default, range and doc. The
resolved config is written into every run directory as ``config.yaml`` and stored in every checkpoint,
so a run can always be reproduced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trainer.config.fields import ConfigError, Section
from trainer.config.sections.data import DataConfig
from trainer.config.sections.finetune import FinetuneConfig, Phase
from trainer.config.sections.logging import LoggingConfig
from trainer.config.sections.model import ModelConfig
from trainer.config.sections.optim import OptimConfig
from trainer.config.sections.train import EarlyStoppingConfig, TrainConfig

__all__ = ["ConfigError", "Config", "DataConfig", "ModelConfig", "Phase", "FinetuneConfig", "OptimConfig",
           "EarlyStoppingConfig", "TrainConfig", "LoggingConfig", "SECTIONS"]


@dataclass
class Config(Section):
    """A whole run. ``name`` identifies the recipe; every section is documented in its class."""

    name: str = "run"
    """Recipe name (used as W&B run name)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _check(self) -> None:
        if self.finetune.phases:
            last = self.finetune.phases[-1].start_epoch
            if last >= self.train.epochs:
                raise ConfigError(f"finetune.phases[{len(self.finetune.phases) - 1}].start_epoch {last} must be "
                                  f"< train.epochs {self.train.epochs}")
        if self.train.feature_cache and self.data.augment != "none":
            raise ConfigError(f"train.feature_cache needs data.augment=none (random augmentation changes the "
                              f"features every epoch), got data.augment={self.data.augment!r}")
        if self.data.task == "multilabel":  # no top-1 there: its default monitor is mAP
            if self.train.early_stopping.monitor == "val/top1":
                self.train.early_stopping.monitor = "val/mAP"
            if self.optim.class_weights != "none":
                raise ConfigError(f"optim.class_weights={self.optim.class_weights!r} is for single-label runs; with "
                                  "data.task=multilabel use optim.pos_weight=auto")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Rules between the augmentation / EMA / strategy fields and the rest."""
        d = self.data
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            if self.train.micro_batch_size % 2:
                raise ConfigError(f"data.mixup_alpha/cutmix_alpha need an even train.micro_batch_size (pairs are "
                                  f"mixed within a micro-batch), got {self.train.micro_batch_size}")
            if self.optim.class_weights != "none":
                raise ConfigError("data.mixup_alpha/cutmix_alpha do not combine with optim.class_weights "
                                  f"({self.optim.class_weights!r}): the soft-target loss has no class weights")
        if self.model.drop_path_rate > 0 and not self.model.backbone.startswith("timm:"):
            raise ConfigError(f"model.drop_path_rate needs a timm backbone ('timm:<name>'), got "
                              f"{self.model.backbone!r}")
        if self.finetune.l2_sp is not None and self.model.weights == "none":
            raise ConfigError("finetune.l2_sp pulls toward the pretrained weights, but model.weights=none starts "
                              "from random ones: set finetune.l2_sp=null")
        if self.finetune.strategy != "epochs" and self.train.feature_cache:
            raise ConfigError(f"train.feature_cache is for finetune.strategy=epochs; strategy "
                              f"{self.finetune.strategy!r} computes its features itself")

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "finetune": FinetuneConfig,
                             "optim": OptimConfig, "train": TrainConfig, "logging": LoggingConfig}
"""Section name -> its class (``--help`` walks these)."""
