"""Class-weighted loss against class imbalance (trainer/finetune/losses.py, optim.class_weights)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers.realdata import HYMENOPTERA, subset_folder

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError, OptimConfig
from trainer.finetune.losses import build_criterion, class_weights


def test_inverse_frequency_weights():
    w = class_weights([120, 10], "inverse")
    assert w.tolist() == pytest.approx([130 / 240, 130 / 20])
    # the sample-weighted mean weight over the training set is 1
    assert float((w * torch.tensor([120.0, 10.0])).sum()) == pytest.approx(130.0)


def test_effective_number_weights_follow_cui_et_al():
    counts = np.array([500, 50, 5])
    for beta in (0.9, 0.99, 0.999):
        eff = (1 - beta ** counts) / (1 - beta)
        expected = (1 / eff) * len(counts) / (1 / eff).sum()
        w = class_weights(counts.tolist(), "effective", beta=beta)
        assert w.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
        assert float(w.sum()) == pytest.approx(3.0, rel=1e-6)
        assert w[0] < w[1] < w[2]
    # beta = 0: every class counts once -> equal weights; beta -> 1: proportional to inverse frequency
    assert class_weights([500, 50, 5], "effective", beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    w = class_weights([500, 50, 5], "effective", beta=0.999999)
    inv = class_weights([500, 50, 5], "inverse")
    assert (w / w.sum()).tolist() == pytest.approx((inv / inv.sum()).tolist(), rel=1e-3)


def test_class_without_samples_gets_zero_weight_and_none_means_no_weights():
    w = class_weights([10, 0, 30], "inverse", class_names=["a", "b", "c"])
    assert w[1] == 0 and torch.isfinite(w).all() and w[0] == pytest.approx(40 / 30)
    assert class_weights([10, 0, 30], "effective", beta=0.99)[1] == 0
    assert class_weights([1, 2], "none") is None
    with pytest.raises(ValueError, match="all class counts are 0"):
        class_weights([0, 0], "inverse")
    with pytest.raises(ValueError, match="must be one of"):
        class_weights([1, 2], "sqrt")


def test_weighted_criterion_is_the_weighted_mean_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 2, generator=g), torch.tensor([0, 0, 0, 0, 1, 1])
    crit = build_criterion(OptimConfig(class_weights="inverse"), [120, 10])
    w = torch.tensor([130 / 240, 130 / 20])[labels]
    per_sample = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert crit(logits, labels).item() == pytest.approx(float((w * per_sample).sum() / w.sum()), rel=1e-5)
    plain = build_criterion(OptimConfig(), None)
    assert plain.weight is None and plain(logits, labels).item() == pytest.approx(per_sample.mean().item())
    with pytest.raises(ValueError, match="class_counts"):
        build_criterion(OptimConfig(class_weights="effective"), None)


def test_config_validates_class_weight_options():
    cfg = load_config(None, {"optim.class_weights": "effective", "optim.class_weights_beta": 0.99})
    assert cfg.optim.class_weights == "effective" and cfg.optim.class_weights_beta == 0.99
    with pytest.raises(ConfigError, match="optim.class_weights"):
        load_config(None, {"optim.class_weights": "balanced"})
    with pytest.raises(ConfigError, match=r"optim.class_weights_beta: 1.0 is not allowed \(allowed: \[0, 1\)\)"):
        load_config(None, {"optim.class_weights_beta": 1.0})


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")
def test_weighted_loss_improves_balanced_accuracy_on_imbalanced_ants_bees(tmp_path):
    """120 ants vs 10 bees in train, balanced val: the unweighted head learns to say "ants"; the
    inverse-frequency weighted one does not. Feature extraction, 1 epoch (8 steps of 16)."""
    from helpers.inprocess import run_in_process

    subset_folder(tmp_path / "images", {"train": {"ants": 120, "bees": 10}, "val": {"ants": 30, "bees": 30}})
    counts = {}
    bal = {}
    for kind in ("none", "inverse"):
        res = run_in_process(tmp_path / "images", tmp_path / "shards", tmp_path / kind,
                             **{"train.epochs": 1, "train.global_batch_size": 16, "train.micro_batch_size": 16,
                                "optim.class_weights": kind})
        bal[kind] = res.last_eval["val/balanced_acc"]
        per_class = {r["class"]: r for r in csv.DictReader((tmp_path / kind / "reports/latest/val_per_class.csv").open())}
        counts[kind] = float(per_class["bees"]["recall"])
    meta = json.loads((tmp_path / "shards/dataset.json").read_text())
    assert meta["splits"]["train"]["class_counts"] == [120, 10]
    # measured: balanced accuracy none 0.50 (bees recall 0.0), inverse 0.97 (bees recall 0.97)
    assert bal["inverse"] > bal["none"] + 0.2, bal
    assert counts["inverse"] > counts["none"] + 0.3, counts
