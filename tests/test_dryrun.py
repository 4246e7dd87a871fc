"""The dry-run group table (trainer/finetune/dryrun.py) for torchvision and timm backbones.

Every parameter must be counted once: the rows of the table sum to the total line, which equals the
model's parameter count, and the groups built the same way partition the parameter names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config.loading import load_config
from trainer.finetune.dryrun import group_table
from trainer.finetune.freezing import trainable_layer_ids
from trainer.finetune.param_groups import build_param_groups
from trainer.finetune.schedule import build_phases_for
from trainer.models.build import build_model
from trainer.models.layers import group_names, layer_ids

REPO = Path(__file__).resolve().parents[1]

# backbone -> layer names expected in the table (stem ... head)
BACKBONES = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "efficientnet_b0": ["stem"] + [f"features.{i}" for i in range(1, 9)] + ["head"],
    # timm's own grouping (group_matcher): blocks.6 shares a group with the final conv and norm
    "timm:tf_efficientnet_lite0": ["stem", "blocks.0.0"] + [f"blocks.{i}" for i in range(1, 6)]
    + ["blocks.6.0+conv_head+bn2", "head"],
}


def _parse(table: str) -> tuple[dict[str, list[str]], int]:
    """Rows of the group table ``{group: [#params, lr, weight_decay, phase0, ...]}`` and the total."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("group"))
    rows, total = {}, None
    for line in lines[start + 2:]:
        if line.startswith("---"):
            continue
        if line.startswith("total"):
            total = int(line.split()[1].replace(",", ""))
            continue
        name, rest = line.split(")", 1)
        rows[name + ")"] = rest.split()
    return rows, total


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_group_table_counts_every_parameter_once(backbone):
    cfg = load_config(None, {"model.backbone": backbone, "model.weights": "none", "finetune.gradual_every": 1,
                             "finetune.layer_decay": 0.5, "train.epochs": 4, "optim.lr": 1e-3,
                             "optim.weight_decay": 0.05})
    table = group_table(cfg, num_classes=2)
    rows, total = _parse(table)

    model, _ = build_model(backbone, 2, "none")
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    assert total == n_params
    assert sum(int(r[0].replace(",", "")) for r in rows.values()) == n_params

    layer_of, num_layers = layer_ids(model, backbone)
    assert group_names(model, backbone) == BACKBONES[backbone]
    groups = build_param_groups([(n, tuple(p.shape)) for n, p in params.items()], layer_of, num_layers,
                                weight_decay=0.05, layer_decay=0.5)
    placed = [n for g in groups for n in g["param_names"]]
    assert len(placed) == len(set(placed)) == len(params) and set(placed) == set(params)
    assert len(rows) == len(groups)

    phases = build_phases_for(cfg, num_layers)
    assert [p.train for p in phases] == ["head", 1, 2, 3]
    head = num_layers - 1
    for g in groups:  # each table row: lr from layer_decay, decay class, trainable flag per phase
        row = rows[f"{g['name']} ({BACKBONES[backbone][g['layer_id']]})"]
        assert float(row[1]) == pytest.approx(1e-3 * 0.5 ** (head - g["layer_id"]), rel=1e-2)
        assert float(row[2]) == (0.0 if g["name"].endswith("no_decay") else 0.05)
        assert row[3:] == ["yes" if g["layer_id"] in trainable_layer_ids(p, num_layers) else "no" for p in phases]
    assert f"{num_layers} layer ids" in table


@pytest.mark.slow  # end to end through the CLI
def test_dry_run_command_prints_table_for_gradual_config():
    """The CLI entry point prints the table of the shipped gradual-unfreezing config and trains nothing."""
    env = {**os.environ, "TRAINER_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "trainer/main.py", "--config", "configs/ants_bees_lite0_gradual.yaml",
                          "--dry_run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows, total = _parse(res.stdout)
    assert total == sum(int(r[0].replace(",", "")) for r in rows.values())
    assert "phase1" in res.stdout and "layer08_decay (head)" in res.stdout
