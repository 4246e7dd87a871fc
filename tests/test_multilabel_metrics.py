"""trainer.reporting.multilabel: hand-computed cases, and agreement with torchmetrics / scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.reporting import multilabel as ml


def _random_case(n=200, c=6, seed=0, decimals=1):
    """Scores rounded to ``decimals`` (many ties), targets with a class that has no positive (the last)."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < 0.3).long()
    targets[:, -1] = 0
    scores = torch.round(torch.rand(n, c, generator=g) * 0.6 + 0.4 * targets, decimals=decimals)
    return scores, targets


def test_average_precision_hand_computed():
    # thresholds 0.9 (P=1, R=.5), 0.8 (P=.5, R=.5), 0.7 (P=2/3, R=1): AP = .5 * 1 + .5 * 2/3
    ap = ml.average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap.shape == (1,)
    assert ap[0].item() == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_average_precision_ties_enter_together():
    # the tied pair (positive first in sample order) is one threshold: P=.5 at R=.5, then P=2/3 at R=1.
    # Ranking the tie's positive first would give .5 + .5 * 2/3 = .833 instead.
    scores, targets = torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 1])
    assert ml.average_precision(scores, targets)[0].item() == pytest.approx(0.25 + 0.5 * 2 / 3)
    assert ml.average_precision(scores.flip(0), targets.flip(0))[0].item() == pytest.approx(0.25 + 0.5 * 2 / 3)


def test_map_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.6, 0.4], [0.7, 0.8, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    ap = ml.average_precision(scores, targets)
    assert ap[0].item() == 1.0 and ap[1].item() == 0.5 and math.isnan(ap[2].item())
    assert ml.mean_average_precision(scores, targets) == pytest.approx(0.75)
    assert math.isnan(ml.mean_average_precision(scores, torch.zeros(3, 3)))
    # micro: pooled pairs ranked 0.9(+) 0.8 0.7 0.6(+) ... -> AP .5 * 1 + .5 * 2/4
    assert ml.micro_average_precision(scores, targets) == pytest.approx(0.75)


def test_average_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ml.average_precision(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        ml.average_precision(torch.tensor([float("nan"), 0.1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="0/1"):
        ml.average_precision(torch.tensor([0.3, 0.1]), torch.tensor([2, 0]))


@pytest.mark.filterwarnings("ignore:No positive samples")
def test_average_precision_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    scores, targets = _random_case()
    c = scores.shape[1]
    ours = ml.average_precision(scores, targets)
    ref = tm.MultilabelAveragePrecision(num_labels=c, average=None, thresholds=None)(scores.float(), targets)
    assert torch.allclose(ours[:-1], ref[:-1].double(), atol=1e-6)
    assert math.isnan(ours[-1].item())
    micro = tm.MultilabelAveragePrecision(num_labels=c, average="micro", thresholds=None)(scores.float(), targets)
    assert ml.micro_average_precision(scores, targets) == pytest.approx(micro.item(), abs=1e-6)


def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    scores, targets = _random_case(seed=1)
    y, s = targets.numpy(), scores.numpy()
    ref = [metrics.average_precision_score(y[:, k], s[:, k]) for k in range(y.shape[1] - 1)]
    assert np.allclose(ml.average_precision(scores, targets)[:-1].numpy(), ref)
    assert ml.micro_average_precision(scores, targets) == pytest.approx(
        metrics.average_precision_score(y, s, average="micro"))
    preds = ml.binarize(scores, 0.5).numpy().astype(np.int64)
    out = ml.f1_scores(preds, y)
    assert np.allclose(out["f1"].numpy(), metrics.f1_score(y, preds, average=None, zero_division=0))
    assert out["macro_f1"] == pytest.approx(metrics.f1_score(y, preds, average="macro", zero_division=0))
    assert out["micro_f1"] == pytest.approx(metrics.f1_score(y, preds, average="micro", zero_division=0))
    assert ml.exact_set_accuracy(preds, y) == pytest.approx(metrics.accuracy_score(y, preds))
    assert ml.hamming_loss(preds, y) == pytest.approx(metrics.hamming_loss(y, preds))


def test_f1_exact_set_and_hamming_hand_computed():
    preds = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]])
    out = ml.f1_scores(preds, targets)
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 2 fp 0 fn 1 -> 4/5; class 2: never present nor predicted -> 0
    assert out["f1"].tolist() == pytest.approx([2 / 3, 4 / 5, 0.0])
    assert out["tp"].tolist() == [1, 2, 0] and out["fp"].tolist() == [1, 0, 0] and out["fn"].tolist() == [0, 1, 0]
    assert out["support"].tolist() == [1, 3, 0]
    assert out["precision"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert out["recall"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert out["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 3)
    assert out["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # tp 3, fp 1, fn 1
    assert ml.exact_set_accuracy(preds, targets) == pytest.approx(0.5)  # rows 0 and 3
    assert ml.hamming_loss(preds, targets) == pytest.approx(2 / 12)


def test_f1_at_thresholds_per_class_and_errors():
    probs = torch.tensor([[0.6, 0.6], [0.3, 0.3]])
    targets = torch.tensor([[1, 0], [1, 1]])
    assert ml.binarize(probs, [0.5, 0.2]).tolist() == [[True, True], [False, True]]
    assert ml.binarize(probs, 0.6).tolist() == [[True, True], [False, False]]  # prob == threshold predicts
    assert ml.f1_at_thresholds(probs, targets, [0.2, 0.5])["f1"].tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="one per class"):
        ml.binarize(probs, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="0/1"):
        ml.f1_scores(probs, targets)


def test_f1_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    scores, targets = _random_case(seed=2)
    c = scores.shape[1]
    preds = ml.binarize(scores, 0.5)
    out = ml.f1_scores(preds, targets)
    hard = preds.float()  # torchmetrics predicts prob > threshold, ours prob >= threshold: compare on 0/1 sets
    ref = tm.MultilabelF1Score(num_labels=c, average=None, threshold=0.5, zero_division=0)(hard, targets)
    assert torch.allclose(out["f1"], ref.double(), atol=1e-6)
    ref = tm.MultilabelF1Score(num_labels=c, average="micro", threshold=0.5, zero_division=0)(hard, targets)
    assert out["micro_f1"] == pytest.approx(ref.item(), abs=1e-6)
    ref = tm.MultilabelExactMatch(num_labels=c, threshold=0.5)(hard, targets)
    assert ml.exact_set_accuracy(preds, targets) == pytest.approx(ref.item())
    ref = tm.MultilabelHammingDistance(num_labels=c, threshold=0.5, average="micro")(hard, targets)
    assert ml.hamming_loss(preds, targets) == pytest.approx(ref.item())


def test_choose_thresholds_hand_computed_and_floor():
    # class 0: candidates 0.9 (F1 .5), 0.8 (.8), 0.6 (.667), 0.4 (6/7 best), 0.2 (.75) -> midpoint (0.4 + 0.2) / 2
    # class 1: one positive < min_positives -> default
    probs = torch.tensor([[0.9, 0.9], [0.8, 0.1], [0.6, 0.2], [0.4, 0.3], [0.2, 0.4]])
    targets = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 0], [0, 0]])
    thr = ml.choose_thresholds(probs, targets, min_positives=2)
    assert thr.dtype == torch.float32
    assert thr.tolist() == pytest.approx([0.3, 0.5])
    assert ml.choose_thresholds(probs, targets, min_positives=1)[1].item() == pytest.approx(0.65)  # (0.9 + 0.4) / 2
    assert ml.choose_thresholds(probs, targets, min_positives=2, default=0.7)[1].item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="min_positives"):
        ml.choose_thresholds(probs, targets, min_positives=0)


def test_choose_thresholds_tie_takes_highest_and_lowest_candidate_itself():
    # F1 at 0.8: tp 1 of 2 predicted, P 2 -> 2/4; at 0.6: tp 2 of 4 -> 4/6 ... construct equal F1:
    # probs .9(+) .7(-) .5(+) .3(-): F1 .9 -> 2/3, .7 -> 2/4, .5 -> 4/5, .3 -> 4/6. Lowest wins alone here; now
    # a tie: .9(+) .8(-) .7(-) .6(+) -> .9: 2/3, .6: 4/6 = 2/3 -> the higher (.9) wins, midpoint with .8
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6])
    targets = torch.tensor([1, 0, 0, 1])
    assert ml.choose_thresholds(probs, targets, min_positives=1).item() == pytest.approx(0.85)
    # every sample positive: best is the lowest probability, which has no lower neighbour -> itself
    assert ml.choose_thresholds(probs, torch.ones(4), min_positives=1).item() == pytest.approx(0.6)


def test_choose_thresholds_maximise_f1_and_are_deterministic():
    scores, targets = _random_case(n=300, seed=3, decimals=2)
    probs = scores.float()
    thr = ml.choose_thresholds(probs, targets, min_positives=5)
    f1 = ml.f1_at_thresholds(probs, targets, thr)["f1"]
    for k in range(probs.shape[1] - 1):  # brute force over every distinct value
        best = max(ml.f1_at_thresholds(probs[:, k], targets[:, k], float(t))["f1"][0].item()
                   for t in torch.unique(probs[:, k]))
        assert f1[k].item() == pytest.approx(best)
    assert thr[-1].item() == 0.5  # no positives -> floor rule
    perm = torch.randperm(probs.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(ml.choose_thresholds(probs[perm], targets[perm], min_positives=5), thr)
    assert torch.equal(ml.choose_thresholds(probs, targets, min_positives=5), thr)


def test_blocks_of_classes_give_the_same_result(monkeypatch):
    scores, targets = _random_case(n=50, c=7, seed=4, decimals=2)
    ap, thr = ml.average_precision(scores, targets), ml.choose_thresholds(scores, targets, min_positives=3)
    monkeypatch.setattr(ml, "BLOCK_ELEMENTS", 2 * 50)  # 2 classes per block, the last block has 1
    assert torch.equal(ml.average_precision(scores, targets).nan_to_num(-1), ap.nan_to_num(-1))
    assert torch.equal(ml.choose_thresholds(scores, targets, min_positives=3), thr)
