"""Multi-label training and evaluation (issue 26): the criterion dispatch, mixup on label sets, the BCE linear probe,
the histogram accumulator against the exact metrics of trainer/reporting/multilabel.py, its rank independence,
thresholds, and one training step + validation + checkpoints/best on a tiny model with multi-hot targets."""

from __future__ import annotations

import csv
import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.fake_accelerator import CpuAccelerator
from torch import nn

from trainer.config.fields import ConfigError
from trainer.config.schema import Config, DataConfig, OptimConfig
from trainer.finetune.linear_probe import fit_linear_probe_multilabel
from trainer.finetune.losses import build_criterion
from trainer.finetune.multilabel_loss import SmoothedBCEWithLogits
from trainer.reporting import multilabel as ml
from trainer.reporting.multilabel_eval import (
    BIN_EDGES,
    MultiLabelAccumulator,
    binned_average_precision,
    score_bins,
)


class MainAccelerator(CpuAccelerator):
    """The CPU stand-in as the main (only) process."""

    is_main_process = True
    process_index = 0


class TwoRanks:
    """Two simulated ranks in two threads: ``reduce`` sums the tensors both ranks pass (an all-reduce)."""

    num_processes = 2

    def __init__(self):
        self.slots: list = [None, None]
        self.barrier = threading.Barrier(2, timeout=60)
        self.local = threading.local()

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        out = self.slots[0] + self.slots[1]
        self.barrier.wait()  # nobody overwrites a slot before both have read it
        return out

    def run(self, accs: list[MultiLabelAccumulator]) -> list:
        results: list = [None, None]

        def one(rank):
            self.local.rank = rank
            results[rank] = accs[rank].reduce(self)

        threads = [threading.Thread(target=one, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results


def _synthetic(n: int = 600, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits correlated with random label sets (the last class has 3 positives: below the threshold floor)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, c, generator=g) < torch.linspace(0.1, 0.5, c)).float()
    y[:, -1] = 0
    y[:3, -1] = 1
    logits = 2.0 * (y - 0.5) * torch.linspace(0.5, 3.0, c) + 1.5 * torch.randn(n, c, generator=g)
    return logits, y


def _accumulate(logits, y, splits=(0,), thresholds=None) -> list[MultiLabelAccumulator]:
    """One accumulator per part of ``[s_0:s_1], [s_1:s_2], ...`` (batches of 37), as ranks would hold them."""
    bounds = list(splits) + [len(y)]
    accs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc = MultiLabelAccumulator(y.shape[1], thresholds=thresholds)
        for i in range(lo, hi, 37):
            acc.update(logits[i:min(i + 37, hi)], y[i:min(i + 37, hi)])
        accs.append(acc)
    return accs


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


# ---- loss -------------------------------------------------------------------------------------------------------


def test_multilabel_criterion_is_bce_with_auto_pos_weight_from_the_counts():
    counts, n = [10, 40, 0], 50
    crit = build_criterion(OptimConfig(pos_weight="auto"), counts, multilabel=True, num_samples=n)
    assert isinstance(crit, SmoothedBCEWithLogits)
    expected = torch.tensor([(50 - 10) / 10, (50 - 40) / 40, 1.0])  # (N - n_c) / n_c; 1 without positives
    assert crit.pos_weight.tolist() == pytest.approx(expected.tolist())
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 3, generator=g), (torch.rand(6, 3, generator=g) < 0.4).float()
    ref = F.binary_cross_entropy_with_logits(logits, y, pos_weight=expected)
    assert crit(logits, y).item() == pytest.approx(ref.item(), rel=1e-6)
    smooth = build_criterion(OptimConfig(label_smoothing=0.2), None, multilabel=True)
    assert smooth.pos_weight is None
    assert smooth(logits, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, y * 0.8 + 0.1).item())
    from timm.loss import AsymmetricLossMultiLabel
    assert isinstance(build_criterion(OptimConfig(multilabel_loss="asl"), None, multilabel=True),
                      AsymmetricLossMultiLabel)
    assert isinstance(build_criterion(OptimConfig(), None), nn.CrossEntropyLoss)  # single-label unchanged
    with pytest.raises(ConfigError, match="optim.class_weights"):
        build_criterion(OptimConfig(class_weights="inverse"), counts, multilabel=True, num_samples=n)
    with pytest.raises(ConfigError, match="optim.pos_weight=auto"):
        build_criterion(OptimConfig(pos_weight="auto"), None, multilabel=True)


def test_new_optim_fields_are_range_checked_and_multilabel_monitors_map():
    from trainer.config.loading import load_config

    with pytest.raises(ConfigError, match="optim.pos_weight"):
        load_config(None, {"optim.pos_weight": "always"})
    with pytest.raises(ConfigError, match="optim.multilabel_loss"):
        load_config(None, {"optim.multilabel_loss": "focal"})
    assert load_config(None, {}).train.early_stopping.monitor == "val/top1"
    if "task" not in {f.name for f in dataclasses.fields(DataConfig)}:
        pytest.skip("data.task is not declared yet")
    cfg = load_config(None, {"data.task": "multilabel"})
    assert cfg.train.early_stopping.monitor == "val/mAP"
    cfg = load_config(None, {"data.task": "multilabel", "train.early_stopping.monitor": "val/loss"})
    assert cfg.train.early_stopping.monitor == "val/loss"


def test_mixup_mixes_label_sets_without_smoothing_them():
    from trainer.data.batch_augment import BatchAugment

    np.random.seed(0)
    aug = BatchAugment(3, mixup_alpha=1.0, mixup_switch_prob=0.0, label_smoothing=0.1, multilabel=True)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).clone()
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    mixed, t = aug(images, y.clone())
    lam = 1 - float(mixed[0, 0, 0, 0]) / 3  # image 0 (value 0) mixed with image 3 (value 3)
    assert 0 < lam < 1
    assert torch.allclose(t, lam * y + (1 - lam) * y.flip(0), atol=1e-6)
    assert float(t[0, 2]) == pytest.approx(1.0, abs=1e-6)  # in both images: stays 1 (smoothing is the loss's)


# ---- linear probe -----------------------------------------------------------------------------------------------


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(3, 16, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 16, generator=g)
    y = (x @ directions.T > 0.3).float()
    return x * 2.0 + 1.0, y  # not standardised: the probe standardises and folds it back


def test_bce_probe_recovers_a_separable_multilabel_problem():
    xt, yt = _separable(400, 0)
    xv, yv = _separable(200, 1)
    res = fit_linear_probe_multilabel(xt, yt, xv, yv, l2_grid=[1e-1, 1e-3, 1e-5],
                                      score=ml.mean_average_precision, max_iter=100)
    assert res.weight.shape == (3, 16) and res.bias.shape == (3,)
    assert res.val_map > 0.97
    logits = xv.double() @ res.weight.double().T + res.bias.double()  # the head on raw features
    assert ml.mean_average_precision(logits, yv) == pytest.approx(res.val_map, abs=2e-3)
    assert res.val_map == max(r["val_map"] for r in res.grid)
    assert [r["l2"] for r in res.grid] == [1e-1, 1e-3, 1e-5]


def test_probe_chooses_l2_by_the_validation_score():
    xt, yt = _separable(200, 2)
    xv, yv = _separable(100, 3)
    grid = [10.0, 1e-2, 1e-4]
    small = fit_linear_probe_multilabel(xt, yt, xv, yv, l2_grid=grid, max_iter=50,
                                        score=lambda z, y: -float(z.abs().mean()))  # prefers small logits
    large = fit_linear_probe_multilabel(xt, yt, xv, yv, l2_grid=grid, max_iter=50,
                                        score=lambda z, y: float(z.abs().mean()))
    assert small.l2 == 10.0 and large.l2 == 1e-4
    with pytest.raises(ValueError, match="0/1"):
        fit_linear_probe_multilabel(xt, yt * 2, xv, yv, l2_grid=grid, score=ml.mean_average_precision)


# ---- accumulator -------------------------------------------------------------------------------------------------


def test_binned_map_is_the_ap_of_the_bins_and_within_its_bound_of_the_exact_ap():
    logits, y = _synthetic()
    res = _accumulate(logits, y)[0].reduce()
    probs = torch.sigmoid(logits.float())
    bins = score_bins(probs).double()
    # exactly scikit-learn's AP with the bin indices as scores (ties enter together)
    assert np.allclose(res.ap, ml.average_precision(bins, y).numpy(), atol=1e-12, equal_nan=True)
    assert res.map_micro == pytest.approx(ml.micro_average_precision(bins, y), abs=1e-12)
    # and within the documented bound of the AP of the unbinned probabilities
    exact = ml.average_precision(probs, y).numpy()
    assert np.all(np.abs(res.ap - exact) <= res.ap_error_bound + 1e-12)
    assert abs(res.map - ml.mean_average_precision(probs, y)) <= res.map_error_bound + 1e-12
    assert abs(res.map_micro - ml.micro_average_precision(probs, y)) <= res.map_micro_error_bound + 1e-12
    assert res.map_error_bound < 0.02  # 600 samples over ~1000 bins: a few per bin
    assert res.num_samples == 600
    assert res.loss == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item(), rel=1e-6)


def test_bound_is_zero_for_one_sample_per_bin_and_grows_with_ties():
    pos = torch.zeros(1, 8, dtype=torch.int64)
    neg = torch.zeros(1, 8, dtype=torch.int64)
    pos[0, 7], neg[0, 6], pos[0, 5] = 1, 1, 1  # scores: +, -, + from the top
    ap, bound = binned_average_precision(pos, neg)
    assert float(ap) == pytest.approx((1 + 2 / 3) / 2) and float(bound) == 0.0
    tied_neg = neg.clone()
    tied_neg[0, 7] = 1  # a negative tied with the top positive
    ap, bound = binned_average_precision(pos, tied_neg)
    assert float(bound) > 0
    for order in ([1, 0, 0, 1], [0, 1, 0, 1]):  # the two orders of the tie: both within the bound
        exact = ml.average_precision(torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor(order, dtype=torch.float64))
        assert abs(float(exact) - float(ap)) <= float(bound) + 1e-12


def test_two_ranks_give_the_same_result_as_one():
    logits, y = _synthetic(n=500, seed=1)
    one = _accumulate(logits, y)[0].reduce()
    two = TwoRanks().run(_accumulate(logits, y, splits=(0, 171)))
    for r in two:
        for f in dataclasses.fields(one):
            if f.name == "loss":  # a float sum: the same up to the order of the additions
                assert r.loss == pytest.approx(one.loss, rel=1e-12)
            else:
                assert _same(getattr(r, f.name), getattr(one, f.name)), f.name
        assert r.as_log() == pytest.approx(one.as_log(), nan_ok=True)
    given = TwoRanks().run(_accumulate(logits, y, splits=(0, 300), thresholds=one.thresholds))
    single = _accumulate(logits, y, thresholds=one.thresholds)[0].reduce()
    for f in ("tp", "fp", "fn", "exact_sets", "ap"):
        assert _same(getattr(given[0], f), getattr(single, f)) and _same(getattr(given[1], f), getattr(single, f))


def test_chosen_thresholds_maximise_f1_and_the_set_metrics_match_the_exact_ones():
    logits, y = _synthetic(seed=2)
    res = _accumulate(logits, y)[0].reduce()
    probs = torch.sigmoid(logits.float())
    assert res.thresholds_chosen and res.thresholds[-1] == ml.DEFAULT_THRESHOLD  # 3 positives < 5: the floor
    assert set(res.thresholds.tolist()) <= set(BIN_EDGES.tolist())
    ref = ml.f1_at_thresholds(probs, y, res.thresholds)  # p >= threshold on the probabilities themselves
    assert res.tp.tolist() == ref["tp"].tolist() and res.fp.tolist() == ref["fp"].tolist()
    assert res.fn.tolist() == ref["fn"].tolist()
    assert res.f1_micro == pytest.approx(ref["micro_f1"]) and res.f1_macro == pytest.approx(ref["macro_f1"])
    preds = ml.binarize(probs, res.thresholds)
    assert res.exact_set_accuracy == pytest.approx(ml.exact_set_accuracy(preds, y))
    assert res.hamming_loss == pytest.approx(ml.hamming_loss(preds, y))
    for c in range(y.shape[1] - 1):  # no bin edge gives a class a higher F1
        pred = probs[:, c, None] >= BIN_EDGES[None, :]
        tp = (pred & (y[:, c, None] > 0)).sum(0).double()
        best = (2 * tp / (pred.sum(0) + y[:, c].sum())).max()
        assert float(ref["f1"][c]) == pytest.approx(float(best), abs=1e-12)
    # given thresholds: the same counts, applied to the probabilities
    given = _accumulate(logits, y, thresholds=res.thresholds)[0].reduce()
    assert not given.thresholds_chosen
    assert (given.tp.tolist(), given.fp.tolist(), given.exact_sets) == (res.tp.tolist(), res.fp.tolist(),
                                                                        res.exact_sets)


def test_thresholds_are_deterministic_whatever_the_sample_order():
    logits, y = _synthetic(seed=3)
    first = _accumulate(logits, y)[0].reduce().thresholds
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(5))
    again = _accumulate(logits[perm], y[perm], splits=(0,))[0].reduce().thresholds
    assert first.tolist() == again.tolist()
    assert _accumulate(logits, y)[0].reduce().thresholds.tolist() == first.tolist()


def test_accumulator_refuses_bad_shapes_and_thresholds():
    acc = MultiLabelAccumulator(3)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        acc.update(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="thresholds"):
        MultiLabelAccumulator(3, thresholds=[0.5, 0.5])
    empty = MultiLabelAccumulator(3).reduce()
    assert empty.num_samples == 0 and np.isnan(empty.map) and np.isnan(empty.exact_set_accuracy)


# ---- one training step, validation, checkpoints/best ------------------------------------------------------------


def _tiny_model(num_classes: int):
    from trainer.models.classifier import ImageClassifier, Preprocessing

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ImageClassifier(backbone, 8, num_classes,
                           preprocessing=Preprocessing(6, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0))


def _multi_hot_batches(n_batches: int, c: int, bs: int = 8, offset: int = 0) -> list[dict]:
    out = []
    for b in range(n_batches):
        idx = range(offset + b * bs, offset + (b + 1) * bs)
        y = torch.stack([torch.tensor([(i >> k) & 1 for k in range(c)], dtype=torch.float32) for i in idx])
        images = torch.stack([torch.randint(0, 256, (3, 6, 6), generator=torch.Generator().manual_seed(i),
                                            dtype=torch.uint8) for i in idx])
        images[:, 0] = (y[:, 0] * 200).to(torch.uint8)[:, None, None]  # class 0 visible in the red channel
        out.append({"image": images, "label": y, "key": [f"k{i}" for i in idx], "skipped": []})
    return out


def test_training_step_and_validation_with_multi_hot_targets(tmp_path):
    from trainer.reporting.reporter import Reporter
    from trainer.reporting.tracking import Tracker
    from trainer.checkpoint.state import Progress
    from trainer.checkpoint.checkpointer import Checkpointer
    from trainer.train.early_stopping import EarlyStopping
    from trainer.checkpoint.labels import checkpoint_task
    from trainer.train.evaluation import record_validation, validate
    from trainer.checkpoint.inference import best_dir, read_model_meta
    from trainer.train.loop import train_step

    c, acc = 3, MainAccelerator()
    names = ["red", "b", "c"]
    model = _tiny_model(c)
    crit = build_criterion(OptimConfig(pos_weight="auto"), [20, 16, 16], multilabel=True, num_samples=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = _multi_hot_batches(4, c)
    model.train()
    for batch in train:
        loss = train_step(model, iter([batch]), optimizer=opt, criterion=crit, accelerator=acc, grad_accum_steps=1,
                          grad_clip=None)
        assert torch.isfinite(loss)
    val = _multi_hot_batches(3, c, offset=100)
    reporter = Reporter(tmp_path, names, acc, Tracker.disabled())
    v = validate(model, None, val, reporter=reporter, num_classes=c, accelerator=acc, monitor="val/mAP",
                 mode="max", multilabel=True)
    for key in ("val/mAP", "val/mAP_micro", "val/f1_micro", "val/f1_macro", "val/exact_set_accuracy",
                "val/hamming_loss", "val/loss"):
        assert key in v.raw and np.isfinite(v.raw[key]), key
    assert "val/top1" not in v.raw and type(v.collector).__name__ == "LabelSetCollector"  # the worst images
    # the same weights evaluated again: the same thresholds
    again = validate(model, None, val, reporter=reporter, num_classes=c, accelerator=acc, monitor="val/mAP",
                     mode="max", multilabel=True)
    assert again.result.thresholds.tolist() == v.result.thresholds.tolist()

    cfg = Config()
    ckpt = Checkpointer(cfg, tmp_path, acc, model=model, optimizer=None, param_names={}, stopper=None, ema=None,
                        class_names=names, preprocessing=model.preprocessing.to_dict())
    stopper, progress = EarlyStopping(monitor="val/mAP"), Progress()
    improved = record_validation(v, progress, extra={"epoch": 0}, tracker=Tracker.disabled(), stopper=stopper,
                                 checkpointer=ckpt, reporter=reporter, is_main=True)
    assert improved
    meta = read_model_meta(best_dir(tmp_path))
    assert meta["thresholds"] == pytest.approx(v.result.thresholds.tolist())
    assert checkpoint_task(meta)[1] == meta["thresholds"]
    assert meta["metrics"]["val/mAP"] == pytest.approx(v.raw["val/mAP"])
    with open(tmp_path / "reports" / "val_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == names
    assert [int(r["support"]) for r in rows] == v.result.support.tolist()
    assert {"ap", "f1", "threshold", "fp", "fn"} <= set(rows[0])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["epochs", "linear_probe"])
def test_multilabel_run_end_to_end(tmp_path, strategy):
    """A whole run on a multi-label manifest (label sets = the colour channels above 127 of small uniform
    JPEGs): val/mAP recorded and monitored, thresholds in checkpoints/best/model.json, the test split evaluated
    at them, per-class tables in reports/."""
    from helpers.data_synth import write_colour_manifest
    from helpers.realdata import run_metrics

    from trainer.config.loading import load_config
    from trainer.checkpoint.inference import read_model_meta
    from trainer.train.start import run

    manifest = write_colour_manifest(tmp_path / "data", ["train"] * 32 + ["val"] * 8 + ["test"] * 8)
    out = tmp_path / "run"
    cfg = load_config(None, {
        "data.manifest": str(manifest), "data.task": "multilabel", "data.shard_dir": str(tmp_path / "shards"),
        "data.num_workers": 1, "data.augment": "none", "data.image_size": 64,
        "model.backbone": "timm:tf_efficientnet_lite0", "model.weights": "package:efficientnet-lite0",
        "finetune.strategy": strategy, "optim.pos_weight": "auto", "optim.lr": 3e-3, "train.epochs": 2,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.output_dir": str(out),
        "logging.wandb": "disabled", "logging.progress": False})
    assert cfg.train.early_stopping.monitor == "val/mAP"
    run(cfg)
    records = run_metrics(out)
    val = [r for r in records if "val/mAP" in r]
    assert val and all(0.0 <= r["val/mAP"] <= 1.0 and 0.0 <= r["val/exact_set_accuracy"] <= 1.0 for r in val)
    assert not any("val/top1" in r for r in records)
    meta = read_model_meta(out / "checkpoints" / "best")
    assert len(meta["thresholds"]) == 3 and all(0.0 <= t <= 1.0 for t in meta["thresholds"])
    assert meta["metrics"]["val/mAP"] == max(r["val/mAP"] for r in val)
    test = [r for r in records if "test/mAP" in r]
    assert len(test) == 1 and test[0]["test/num_samples"] == 8
    assert (out / "reports" / "val_per_class.csv").is_file() and (out / "reports" / "test_per_class.csv").is_file()
    if strategy == "linear_probe":
        assert any("lp/val_mAP" in r for r in records)


STRATEGIES = {
    "fine_tuning": {"finetune.freeze": "none"},
    "partial": {"finetune.phases": [{"start_epoch": 0, "train": "head"}, {"start_epoch": 1, "train": 2}]},
    "gradual": {"finetune.gradual_every": 1, "finetune.gradual_start_epoch": 1},
    "lp_ft": {"finetune.strategy": "lp_ft", "finetune.freeze": "none"},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_a_multilabel_model(tmp_path, strategy):
    """Fine-tuning, partial and gradual unfreezing and LP-FT on label sets: at the end of the run (``last.pt``) the
    backbone layers the strategy unfreezes have moved, the stem of the partial / gradual runs stays as built,
    val/mAP is recorded for every epoch and thresholds are saved (a tiny random-weight timm model, 2 epochs)."""
    from helpers.data_synth import write_colour_manifest
    from helpers.realdata import run_metrics

    from trainer.checkpoint.inference import read_model_meta
    from trainer.checkpoint.state import load
    from trainer.config.loading import load_config
    from trainer.models.build import build_model
    from trainer.train.start import run

    manifest = write_colour_manifest(tmp_path / "data", ["train"] * 32 + ["val"] * 8)
    out = tmp_path / "run"
    cfg = load_config(None, {
        "data.manifest": str(manifest), "data.task": "multilabel", "data.shard_dir": str(tmp_path / "s"),
        "data.num_workers": 0, "data.augment": "none", "data.image_size": 32,
        "model.backbone": "timm:test_efficientnet", "model.weights": "none", "optim.lr": 0.02,
        "optim.warmup_steps": 0, "train.epochs": 2, "train.global_batch_size": 8, "train.micro_batch_size": 8,
        "train.ema_decay": None, "train.output_dir": str(out), "logging.wandb": "disabled",
        "logging.progress": False, **STRATEGIES[strategy]})
    run(cfg)
    val = [r for r in run_metrics(out) if "val/mAP" in r]
    assert len(val) >= 2 and all(0.0 <= r["val/mAP"] <= 1.0 for r in val)
    best = out / "checkpoints" / "best"
    assert len(read_model_meta(best)["thresholds"]) == 3
    torch.manual_seed(cfg.train.seed)  # the run builds its model right after seeding: the same initial weights
    model = build_model(cfg.model.backbone, 3, "none")[0]
    params = {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    initial = model.state_dict()
    saved = load(out / "checkpoints" / "last.pt")["model"]  # the weights at the end (best/ may be the probe's)
    moved = {n for n in params if not torch.equal(saved[n], initial[n])}
    stem = next(n for n in params if "conv_stem" in n)
    assert (stem in moved) == (strategy in ("fine_tuning", "lp_ft"))  # partial / gradual: the stem stays frozen
    assert moved  # and some backbone layer trained in every strategy
    if strategy == "lp_ft":
        assert any("lp/val_mAP" in r for r in run_metrics(out))
