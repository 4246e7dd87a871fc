"""Layer ids: which backbone stage each parameter belongs to (timm ``group_matcher``, torchvision module names)."""

from __future__ import annotations

from torch import nn

from trainer.models.classifier import ImageClassifier
from trainer.models.weights import split_backbone


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
    if split_backbone(backbone)[0] == "timm":
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


