"""The model: :class:`ImageClassifier` (normalisation -> ``backbone`` -> pooled features -> ``head`` -> logits)
and its :class:`Preprocessing`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# Model wrapper
# --------------------------------------------------------------------------------------------
class ImageClassifier(nn.Module):
    """Normalisation, backbone (images -> pooled features), dropout and a fresh linear head.

    The model owns its input conventions: given ``uint8`` images it converts them to its memory
    format and normalises them with its :class:`Preprocessing` mean/std (:meth:`normalize`), so the
    training loop, evaluation and prediction pass the loader's uint8 batches as they are.

    Args:
        backbone: module mapping ``images: (B, 3, H, W) float32`` (normalised) to pooled
            ``features: (B, F) float32``.
        num_features: F, the feature width of ``backbone``.
        num_classes: C, the number of output classes (size of the class map).
        drop_rate: dropout probability applied to the features before ``head`` (0 = none). The
            dropout lives in ``head_drop`` (no parameters) so parameter names are always
            ``head.weight`` / ``head.bias`` whatever the drop rate.
        preprocessing: the backbone's input constants (mean/std are kept as non-persistent buffers
            ``mean``/``std``, so they follow ``.to(device)`` and are not in the ``state_dict``);
            ``None``: the model accepts only normalised float images.
        channels_last: convert uint8 inputs to the channels_last memory format (the caller converts
            the parameters: ``model.to(memory_format=torch.channels_last)``).

    Raises:
        ValueError: ``num_features``/``num_classes`` < 1 or ``drop_rate`` outside [0, 1).
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, drop_rate: float = 0.0, *,
                 preprocessing: Preprocessing | None = None, channels_last: bool = False):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"model.drop_rate must be in [0, 1), got {drop_rate}")
        self.backbone = backbone
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(num_features, num_classes)
        self.preprocessing = preprocessing
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if preprocessing is not None:
            self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images: (B, 3, H, W) uint8`` (0-255) -> ``(B, 3, H, W) float32`` ``(images / 255 - mean) / std``
        in the model's memory format, on the images' device.

        Raises:
            ValueError: no preprocessing was given, or ``images`` is not ``(B, 3, H, W) uint8``.
        """
        if self.preprocessing is None:
            raise ValueError("ImageClassifier without preprocessing: pass normalised float32 images")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"normalize: images must be (B, 3, H, W) uint8, got {tuple(images.shape)} "
                             f"{images.dtype}")
        x = images.contiguous(memory_format=self.memory_format).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images: (B, 3, H, W) float32`` (any memory format) -> ``features: (B, F) float32``."""
        feats = self.backbone(images)
        if feats.ndim != 2:  # e.g. a backbone returning (B, F, 1, 1); reshape works for channels_last
            feats = feats.reshape(feats.shape[0], -1)
        return feats

    def forward(self, images: torch.Tensor, *, features: bool = False) -> torch.Tensor:
        """``images: (B, 3, H, W)`` -> ``logits: (B, C) float32`` (unnormalised scores).

        Feature extraction does not pay for the backbone's backward: when no backbone parameter
        requires grad (``trainer.finetune.freezing.frozen_entirely``) and the input does not either, the
        backbone runs under ``torch.no_grad()`` (no autograd graph, no saved activations); only the
        head is recorded for backward.

        Args:
            images: ``uint8`` images (normalised here, see :meth:`normalize`), ``float32`` images
                already normalised, or with ``features=True`` the backbone's ``(B, F) float32``
                features (``trainer.train.feature_cache``): only the head runs.
        """
        if features:
            feats = images
        else:
            if images.dtype == torch.uint8:
                images = self.normalize(images)
            if (torch.is_grad_enabled() and not images.requires_grad
                    and not any(p.requires_grad for p in self.backbone.parameters())):
                with torch.no_grad():
                    feats = self.forward_features(images)
            else:
                feats = self.forward_features(images)
        return self.head(self.head_drop(feats))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Input pipeline constants that belong to the backbone's pretrained weights.

    Read from timm's ``pretrained_cfg`` (via ``timm.data.resolve_model_data_config``) or from the
    torchvision weights' ``transforms()`` (``crop_size``, ``resize_size``, ``mean``, ``std``,
    ``interpolation``). Saved in checkpoints (``to_dict``) so prediction uses the same values.

    Attributes:
        input_size: side of the square network input in pixels (e.g. 224).
        mean: per-channel RGB mean on the [0, 1] scale.
        std: per-channel RGB std on the [0, 1] scale.
        interpolation: resize interpolation name ("bilinear", "bicubic", ...).
        crop_pct: eval centre-crop fraction: resize the short side to ``input_size / crop_pct``
            then centre-crop ``input_size`` (torchvision: ``crop_size / resize_size``).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    def __post_init__(self):
        if int(self.input_size) < 1:
            raise ValueError(f"Preprocessing.input_size must be >= 1, got {self.input_size}")
        for key in ("mean", "std"):
            val = tuple(float(v) for v in getattr(self, key))
            if len(val) != 3:
                raise ValueError(f"Preprocessing.{key} must have 3 values (RGB), got {val}")
            object.__setattr__(self, key, val)
        if any(s <= 0 for s in self.std) or any(v > 1.0 for v in self.mean + self.std):
            raise ValueError(f"Preprocessing: mean/std must be in 0-1 units with std > 0 (e.g. 0.485, 0.229), "
                             f"got mean={self.mean} std={self.std}")
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise ValueError(f"Preprocessing.crop_pct must be in (0, 1], got {self.crop_pct}")
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "interpolation", str(self.interpolation))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict (lists instead of tuples)."""
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        """Inverse of :meth:`to_dict`. Raises ``KeyError``/``ValueError`` naming the missing or
        unknown key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        missing = fields - set(d)
        if unknown:
            raise ValueError(f"Preprocessing: unknown key(s) {sorted(unknown)}")
        if missing:
            raise KeyError(f"Preprocessing: missing key(s) {sorted(missing)}")
        return cls(**{k: d[k] for k in fields})




