"""End to end: a run on class folders with a held-out test split ends with checkpoints/best evaluated on it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.realdata import HYMENOPTERA, run_metrics, tiny_overrides

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_class_folders_with_test_split_end_with_test_metrics(tmp_path):
    root = tmp_path / "classes"  # root/<class>/<image>: no split folders
    for cls in ("ants", "bees"):
        (root / cls).mkdir(parents=True)
        for p in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:16]:
            shutil.copy(p, root / cls / p.name)
    out = tmp_path / "run"
    args = [sys.executable, "trainer/main.py", "--config", "configs/ants_bees_lite0.yaml",
            *tiny_overrides(root, tmp_path / "shards", out, **{"train.epochs": 1, "data.val_fraction": 0.25,
                                                                "data.test_fraction": 0.25, "data.download_url": "null",
                                                                "data.tree_sha256": "null", "optim.warmup_steps": 0})]
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-4000:]
    meta = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert {s: m["num_samples"] for s, m in meta["splits"].items()} == {"train": 16, "val": 8, "test": 8}
    rows = run_metrics(out)
    test = [r for r in rows if "test/top1" in r]
    assert len(test) == 1 and test[0]["test/num_samples"] == 8 and 0 <= test[0]["test/top1"] <= 1
    assert "test/loss" in test[0] and "test/balanced_acc" in test[0]
    reports = out / "reports"
    for name in ("test_confusion_matrix.png", "test_per_class_accuracy.png", "test_predictions.csv",
                 "test_per_class.csv", "test_confused_pairs.csv", "test_metrics.json"):
        assert (reports / name).is_file(), name
    assert json.loads((reports / "test_metrics.json").read_text())["test/top1"] == test[0]["test/top1"]
