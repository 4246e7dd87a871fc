"""timm's own folder format for a trained :class:`~trainer.models.classifier.ImageClassifier` with a timm backbone.

``timm.create_model("local-dir:<folder>", pretrained=True)`` (timm >= 1.0, ``timm/models/_hub.py``
``load_model_config_from_path`` and ``_builder.py`` ``load_pretrained``) reads two files of a folder:

* ``config.json`` - ``architecture`` (the timm model name, without a pretrained tag), ``num_classes``,
  ``num_features``, ``label_names`` (class names in output order) and ``pretrained_cfg``: the backbone's own
  pretrained config with the run's eval preprocessing in it (``input_size``, ``mean``, ``std``, ``interpolation``,
  ``crop_pct``, ``crop_mode: center``), so ``timm.data.resolve_data_config({}, model=m)`` gives the run's
  preprocessing and ``timm.data.create_transform(**that, is_training=False)`` is the trainer's eval transform
  (resize the short side to ``floor(input_size / crop_pct)``, centre-crop ``input_size``, normalise). The same
  fields as timm's ``save_config_for_hf`` writes; no ``model_args``: the trainer builds its backbones with
  timm's default arguments.
* ``model.safetensors`` - the weights under timm's key names: the classifier's ``backbone.<k>`` is ``<k>`` and
  its ``head.weight`` / ``head.bias`` are timm's classifier (``pretrained_cfg["classifier"]``: ``classifier``,
  ``fc``, ``head.fc``, ``head`` ...). timm's model with ``num_classes=C`` loads them strictly.

:func:`timm_layout` decides whether a trained model is exactly such a timm model (once per backbone, class count
and input size in a process: the timm model is built on the ``meta`` device, no weights are allocated);
:func:`to_timm_keys` / :func:`from_timm_keys` map a state dict between the two namings; :func:`timm_config` is
the ``config.json`` content. A model that timm cannot express (a torchvision backbone, a classifier that is not
one ``nn.Linear`` on the pooled features, a fixed-size model trained at another input size) gets a reason in
words instead, and its checkpoint stays in the trainer's own naming.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import torch
from torch import nn

CONFIG_FILE = "config.json"
"""The file ``timm.create_model("local-dir:...")`` reads first."""

_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")
# describe the pretrained source checkpoint, not the fine-tuned one (timm's export drops them as well)
_SOURCE_ONLY = ("label_offset", "label_names", "label_descriptions", "test_input_size", "test_crop_pct",
                "test_pool_size")
_KEEP_NULL = ("pool_size", "first_conv", "classifier")


@dataclasses.dataclass(frozen=True)
class TimmLayout:
    """How a trained classifier maps onto timm's model of the same architecture.

    Attributes:
        architecture: timm model name without its pretrained tag (``tf_efficientnet_lite0``).
        classifier: dotted name of timm's classifier ``nn.Linear`` (``classifier``, ``fc``, ``head.fc``, ``head``).
        num_features: F, the width of the pooled features the classifier reads.
        pretrained_cfg: the backbone's own timm pretrained config (plain JSON values; source fields removed).
    """

    architecture: str
    classifier: str
    num_features: int
    pretrained_cfg: dict

    def to_dict(self) -> dict:
        """``{"architecture", "classifier"}``: what ``model.json`` records to read the weights back."""
        return {"architecture": self.architecture, "classifier": self.classifier}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


@functools.lru_cache(maxsize=8)
def _reference(name: str, num_classes: int) -> tuple[str, str, int, dict, tuple] | str:
    """timm's ``name`` with ``num_classes`` outputs: (architecture, classifier, F, pretrained_cfg, key shapes), or
    why there is none, in words (cached either way: a model timm cannot express is not rebuilt at every save)."""
    try:
        return _build_reference(name, num_classes)
    except Exception as e:  # unknown name, a classifier timm builds otherwise, a constructor failing on CPU
        return " ".join(str(e).split())[:200] or type(e).__name__


def _build_reference(name: str, num_classes: int) -> tuple[str, str, int, dict, tuple]:
    """See :func:`_reference`. Built on the ``meta`` device (no memory, no initialisation cost); a model whose
    constructor needs real tensors is built on the CPU instead. Raises ``ValueError`` (in words) when the
    classifier is not one Linear."""
    import timm

    with torch.random.fork_rng(devices=[]):  # a run's random stream must not depend on when a checkpoint is saved
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except Exception:  # a constructor reading values (e.g. .tolist()) cannot run on meta tensors
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    classifier = cfg.get("classifier")
    if not isinstance(classifier, str):
        raise ValueError(f"timm's {name} has classifier {classifier!r}, not one layer")
    try:
        layer = model.get_submodule(classifier)
    except AttributeError:
        raise ValueError(f"timm's {name} has no module {classifier!r} (its pretrained_cfg classifier)") from None
    if not isinstance(layer, nn.Linear) or layer.out_features != num_classes or layer.bias is None:
        raise ValueError(f"timm's {name} classifier {classifier!r} is a {type(layer).__name__}, not a Linear "
                         f"with {num_classes} outputs and a bias")
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    arch = timm.models.split_model_name_tag(name)[0]
    kept = {k: _plain(v) for k, v in cfg.items() if k not in _SOURCE_KEYS}
    return arch, classifier, int(layer.in_features), kept, shapes


def timm_layout(backbone: str, state: Mapping[str, torch.Tensor], num_classes: int,
                input_size: int) -> tuple[TimmLayout | None, str]:
    """Whether ``state`` (an :class:`ImageClassifier` ``state_dict``: ``backbone.*``, ``head.weight``,
    ``head.bias``) is exactly timm's ``backbone`` model with ``num_classes`` outputs.

    Args:
        backbone: ``config.model.backbone`` (``timm:<name>``, a tag allowed; anything else is not timm's).
        state: tensors by name (only names and shapes are read).
        num_classes: C. input_size: the run's square input side in pixels.

    Returns:
        ``(layout, "")``, or ``(None, reason)`` with the reason in words (never raises for a model timm lacks).
    """
    if not backbone.startswith("timm:"):
        return None, f"{backbone} is not a timm backbone"
    name = backbone[len("timm:"):]
    ref = _reference(name, int(num_classes))
    if isinstance(ref, str):
        return None, ref
    arch, classifier, features, cfg, shapes = ref
    want = dict(shapes)
    try:
        got = {k: tuple(v.shape) for k, v in to_timm_keys(state, classifier).items()}
    except KeyError as e:
        return None, str(e.args[0])
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shape = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        return None, (f"the weights are not timm's {name} with {num_classes} classes (missing {missing[:3]}, "
                      f"unexpected {extra[:3]}, other shapes {shape[:3]})")
    size = cfg.get("input_size") or [3, 224, 224]
    if cfg.get("fixed_input_size") and list(size[1:]) != [input_size, input_size]:
        return None, f"timm's {name} has a fixed input size {size[1:]}, the run used {input_size}"
    return TimmLayout(arch, classifier, features, cfg), ""


def to_timm_keys(state: Mapping[str, torch.Tensor], classifier: str) -> dict[str, torch.Tensor]:
    """``backbone.<k>`` -> ``<k>``; ``head.weight`` / ``head.bias`` -> ``<classifier>.weight`` / ``.bias``.

    Raises:
        KeyError: a key outside that naming, or a backbone key that would collide with the classifier's.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("head.weight", "head.bias"):
            new = f"{classifier}.{key.rpartition('.')[2]}"
        elif key.startswith("backbone."):
            new = key[len("backbone."):]
        else:
            raise KeyError(f"weight {key!r} is neither backbone.* nor the head")
        if new in out:
            raise KeyError(f"weight {key!r} collides with timm's classifier {new!r}")
        out[new] = value
    return out


def from_timm_keys(state: Mapping[str, torch.Tensor], classifier: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_timm_keys`: timm's names -> the classifier's (``backbone.*``, ``head.*``)."""
    head = {f"{classifier}.weight": "head.weight", f"{classifier}.bias": "head.bias"}
    return {head.get(k, "backbone." + k): v for k, v in state.items()}


def timm_config(layout: TimmLayout, class_names: list[str], preprocessing: Mapping[str, Any]) -> dict:
    """The content of ``config.json`` (see the module docstring).

    Args:
        layout: from :func:`timm_layout`. class_names: C names in output order.
        preprocessing: ``Preprocessing.to_dict()`` of the checkpoint (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``).
    """
    cfg = {k: v for k, v in layout.pretrained_cfg.items()
           if k not in _SOURCE_ONLY and k != "architecture" and (v is not None or k in _KEEP_NULL)}
    size = int(preprocessing["input_size"])
    if list((cfg.get("input_size") or [3, 224, 224])[1:]) != [size, size]:
        cfg["pool_size"] = None  # the source's final feature-map size no longer applies
    cfg.update(input_size=[3, size, size], mean=[float(v) for v in preprocessing["mean"]],
               std=[float(v) for v in preprocessing["std"]], interpolation=str(preprocessing["interpolation"]),
               crop_pct=float(preprocessing["crop_pct"]), crop_mode="center", num_classes=len(class_names),
               classifier=layout.classifier, custom_load=False)
    return {"architecture": layout.architecture, "num_classes": len(class_names),
            "num_features": layout.num_features, "label_names": list(class_names), "pretrained_cfg": cfg}
