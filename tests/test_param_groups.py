"""Tests for trainer/finetune/param_groups.py (pure)."""

import pytest
import torch

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
from trainer.finetune.param_groups import (
    build_param_groups,
    format_group_table,
    is_no_decay,
)

PARAMS = [
    ("backbone.pos_embed", (1, 197, 64)),
    ("backbone.cls_token", (1, 1, 64)),
    ("backbone.patch.weight", (64, 3, 16, 16)),
    ("backbone.patch.bias", (64,)),
    ("backbone.blocks.0.norm.weight", (64,)),
    ("backbone.blocks.0.fc.weight", (64, 64)),
    ("backbone.blocks.1.fc.weight", (64, 64)),
    ("backbone.blocks.1.fc.bias", (64,)),
    ("backbone.blocks.1.gamma", (64,)),
    ("head.weight", (10, 64)),
    ("head.bias", (10,)),
]
LAYER_OF = {"backbone.pos_embed": 0, "backbone.cls_token": 0, "backbone.patch.weight": 0, "backbone.patch.bias": 0,
            "backbone.blocks.0.norm.weight": 1, "backbone.blocks.0.fc.weight": 1, "backbone.blocks.1.fc.weight": 2,
            "backbone.blocks.1.fc.bias": 2, "backbone.blocks.1.gamma": 2, "head.weight": 3, "head.bias": 3}


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_groups_layer_decay_and_no_decay():
    groups = build_param_groups(PARAMS, LAYER_OF, 4, weight_decay=0.05, layer_decay=0.5)
    g = _by_name(groups)
    assert [x["name"] for x in groups] == ["layer00_decay", "layer00_no_decay", "layer01_decay", "layer01_no_decay",
                                         "layer02_decay", "layer02_no_decay", "layer03_decay", "layer03_no_decay"]
    assert g["layer00_no_decay"]["param_names"] == ["backbone.pos_embed", "backbone.cls_token", "backbone.patch.bias"]
    assert g["layer00_decay"]["param_names"] == ["backbone.patch.weight"]
    assert g["layer02_no_decay"]["param_names"] == ["backbone.blocks.1.fc.bias", "backbone.blocks.1.gamma"]
    # lr_scale = layer_decay ** (num_layers - 1 - layer_id); head = 1
    for name, scale in [("layer00_decay", 0.125), ("layer01_decay", 0.25), ("layer02_no_decay", 0.5),
                        ("layer03_decay", 1.0), ("layer03_no_decay", 1.0)]:
        assert g[name]["lr_scale"] == pytest.approx(scale)
    assert all(x["weight_decay"] == (0.0 if x["name"].endswith("no_decay") else 0.05) for x in groups)
    placed = sorted(n for x in groups for n in x["param_names"])
    assert placed == sorted(n for n, _ in PARAMS)
    assert g["layer02_decay"]["layer_id"] == 2


def test_explicit_layer_lr_scale_and_exclusive():
    groups = build_param_groups(PARAMS, LAYER_OF, 4, weight_decay=0.0, layer_lr_scale={0: 0.01, 2: 0.3})
    g = _by_name(groups)
    assert g["layer00_decay"]["lr_scale"] == 0.01 and g["layer01_decay"]["lr_scale"] == 1.0
    assert g["layer02_decay"]["lr_scale"] == 0.3 and g["layer03_decay"]["lr_scale"] == 1.0
    assert all(x["weight_decay"] == 0.0 for x in groups)
    with pytest.raises(ConfigError, match="finetune.layer_lr_scale: layer id 9"):
        build_param_groups(PARAMS, LAYER_OF, 4, weight_decay=0.1, layer_lr_scale={9: 0.1})
    # the ranges are the config's: named as finetune.*, not optim.*
    with pytest.raises(ConfigError, match="finetune.layer_decay and finetune.layer_lr_scale"):
        load_config(None, {"finetune.layer_decay": 0.7, "finetune.layer_lr_scale": {0: 0.1}})
    with pytest.raises(ConfigError, match=r"finetune.layer_decay: 1.5 is not allowed \(allowed: \(0, 1\] or null\)"):
        load_config(None, {"finetune.layer_decay": 1.5})
    with pytest.raises(ConfigError, match=r"finetune.layer_lr_scale"):
        load_config(None, {"finetune.layer_lr_scale": {1: -0.5}})


def test_no_decay_rules():
    assert is_no_decay("backbone.encoder.pos_embedding", (1, 197, 768))
    assert is_no_decay("backbone.class_token", (1, 1, 768))
    assert not is_no_decay("backbone.pos_embed_proj.weight", (3, 3))  # whole components only
    assert not is_no_decay("backbone.blocks.0.norm.weight", (64,), no_decay_1d=False)
    assert is_no_decay("backbone.blocks.0.fc.weight", (64, 64), extra_no_decay=("blocks.0.fc.weight",))
    groups = build_param_groups(PARAMS, LAYER_OF, 4, weight_decay=0.1, no_decay_1d=False,
                                extra_no_decay=("gamma",))
    g = _by_name(groups)
    assert "backbone.blocks.0.norm.weight" in g["layer01_decay"]["param_names"]
    assert g["layer02_no_decay"]["param_names"] == ["backbone.blocks.1.gamma"]


def test_every_parameter_exactly_once_errors():
    with pytest.raises(ValueError, match="without layer id.*head.bias"):
        build_param_groups(PARAMS, {k: v for k, v in LAYER_OF.items() if k != "head.bias"}, 4, weight_decay=0.1)
    with pytest.raises(ValueError, match="unknown parameter.*ghost"):
        build_param_groups(PARAMS, {**LAYER_OF, "ghost": 0}, 4, weight_decay=0.1)
    with pytest.raises(ValueError, match="duplicated.*head.weight"):
        build_param_groups(PARAMS + [("head.weight", (10, 64))], LAYER_OF, 4, weight_decay=0.1)
    with pytest.raises(ValueError, match="outside"):
        build_param_groups(PARAMS, {**LAYER_OF, "head.bias": 4}, 4, weight_decay=0.1)


def test_real_model_builds_optimizer():
    from trainer.models.build import build_model
    from trainer.models.layers import layer_ids

    model, _ = build_model("resnet18", 3, "none")
    layer_of, n = layer_ids(model, "resnet18")
    named = dict(model.named_parameters())
    groups = build_param_groups([(k, tuple(p.shape)) for k, p in named.items()], layer_of, n,
                                weight_decay=1e-4, layer_decay=0.8)
    assert len(groups) == 2 * n
    opt = torch.optim.AdamW([{"params": [named[k] for k in g["param_names"]], "lr": 1e-3 * g["lr_scale"],
                              "weight_decay": g["weight_decay"], "name": g["name"]} for g in groups])
    assert sum(p.numel() for pg in opt.param_groups for p in pg["params"]) == sum(p.numel() for p in named.values())
    table = format_group_table(groups, {k: p.numel() for k, p in named.items()}, 1e-3,
                               [{n - 1}, set(range(n))])
    lines = table.splitlines()
    assert lines[0].split() == ["group", "#params", "lr", "weight_decay", "phase0", "phase1"]
    head_row = next(line for line in lines if line.startswith("layer05_decay"))
    assert head_row.split() == ["layer05_decay", "1,536", "0.001", "0.0001", "yes", "yes"]
    stem_row = next(line for line in lines if line.startswith("layer00_no_decay"))
    assert stem_row.split()[1:] == ["128", f"{1e-3 * 0.8 ** 5:.3g}", "0", "no", "yes"]
    total = sum(p.numel() for p in named.values())
    assert lines[-1].split()[:2] == ["total", f"{total:,}"]
    with pytest.raises(KeyError, match="head.bias"):
        format_group_table(groups, {k: 1 for k in named if k != "head.bias"}, 1e-3, [])
