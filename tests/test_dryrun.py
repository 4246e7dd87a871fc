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
from trainer.data.survey import survey_data
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


# ----------------------------------------------------------------------------------------------
# the data line: the class list read from the configured data, nothing written


def _tiny_images(folder: Path, classes: list[str], per_class: int) -> None:
    from PIL import Image
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (4, 4), (i * 40 % 256, 0, 0)).save(folder / c / f"{i}.png")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _data_cfg(tmp_path, **data):
    return load_config(None, {"model.backbone": "resnet18", "model.weights": "none",
                              "data.shard_dir": str(tmp_path / "shards"), **{f"data.{k}": v for k, v in data.items()}})


def test_dry_run_lists_split_folders_without_writing(tmp_path):
    """A 10-class folder whose shards were never written: 10 classes (not the old fallback 2), split sizes."""
    classes = [f"class{i:02d}" for i in range(10)]
    _tiny_images(tmp_path / "d" / "train", classes, 3)
    _tiny_images(tmp_path / "d" / "val", classes, 1)
    before = _tree(tmp_path)
    text = group_table(_data_cfg(tmp_path, root=str(tmp_path / "d")))
    first = text.splitlines()[0]
    assert f"listing of {tmp_path / 'd'}" in first
    assert "10 classes: class00, class01, class02" in first and "class09" in first and "more" not in first
    assert first.endswith("splits: train 30, val 10")
    assert "10 classes\n" in text  # the head the table was built with
    assert _tree(tmp_path) == before  # no shard folder, no dataset.json, nothing else


def test_dry_run_lists_class_folders_and_truncates_long_lists(tmp_path):
    classes = [f"c{i:02d}" for i in range(13)]
    _tiny_images(tmp_path / "d", classes, 4)
    before = _tree(tmp_path)
    summary = survey_data(_data_cfg(tmp_path, root=str(tmp_path / "d"), val_fraction=0.25).data, download=False,
                          image_sizes=False)
    assert summary.classes == tuple(classes) and summary.split_sizes == {"train": 39, "val": 13}
    line = summary.line(limit=3)
    assert "13 classes: c00, c01, c02, ... (10 more); splits: train 39, val 13" in line
    assert _tree(tmp_path) == before


def test_dry_run_reads_a_manifest(tmp_path):
    _tiny_images(tmp_path / "img", ["ant", "bee", "wasp"], 2)
    rows = [f"img/{c}/{i}.png,{c},{'train' if i == 0 else 'val'}" for c in ("wasp", "ant", "bee") for i in range(2)]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    summary = survey_data(_data_cfg(tmp_path, manifest=str(tmp_path / "m.csv")).data, download=False,
                          image_sizes=False)
    assert summary.classes == ("ant", "bee", "wasp") and summary.split_sizes == {"train": 3, "val": 3}


def test_dry_run_reads_dataset_json_of_written_shards(tmp_path):
    from trainer.data.meta import build_meta, write_meta
    split = {"num_samples": 3, "num_shards": 1, "class_counts": [1, 1, 1], "shards": ["train-000000.tar"]}
    write_meta(tmp_path / "shards" / "dataset.json",
               build_meta(["x", "y", "z"], {"train": split, "val": {**split, "shards": ["val-000000.tar"]}}))
    summary = survey_data(_data_cfg(tmp_path).data, download=False,
                          image_sizes=False)
    assert summary.classes == ("x", "y", "z") and summary.split_sizes == {"train": 3, "val": 3}
    assert summary.source == str(tmp_path / "shards" / "dataset.json")


@pytest.mark.parametrize("case", ["missing_root", "empty_class", "bad_manifest", "would_download"])
def test_dry_run_says_so_when_the_data_cannot_be_read(tmp_path, case):
    overrides = {
        "missing_root": {"root": str(tmp_path / "nope")},
        "empty_class": {"root": str(tmp_path / "d")},
        "bad_manifest": {"manifest": str(tmp_path / "m.csv")},
        "would_download": {"download_url": "http://127.0.0.1:9/x.zip"},
    }[case]
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    (tmp_path / "m.csv").write_text("path,label,split\nx.png,,train\n")
    before = _tree(tmp_path)
    text = group_table(_data_cfg(tmp_path, **overrides))
    first = text.splitlines()[0]
    assert first.startswith("data: cannot be read (") and first.endswith("the table below assumes 2 classes")
    assert {"missing_root": "folder not found", "empty_class": "no image", "bad_manifest": "m.csv",
            "would_download": "downloads nothing"}[case] in first, first
    assert "2 classes\n" in text
    assert _tree(tmp_path) == before
