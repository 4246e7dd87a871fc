"""trainer.finetune.multilabel_loss: BCE with pos_weight / label smoothing, auto pos_weight, timm's ASL."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.finetune.multilabel_loss import (
    MAX_POS_WEIGHT,
    SmoothedBCEWithLogits,
    auto_pos_weight,
    build_multilabel_criterion,
)


def _bce(z: float, y: float, w: float = 1.0) -> float:
    """Hand formula: -(w y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)))."""
    p = 1 / (1 + math.exp(-z))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_bce_is_mean_over_elements_hand_computed():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = build_multilabel_criterion("bce")(logits, targets)
    expected = (_bce(2, 1) + _bce(-1, 0) + _bce(0.5, 0) + _bce(0, 1)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bce_label_smoothing_moves_targets_towards_half():
    logits = torch.tensor([[2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0]])
    loss = build_multilabel_criterion("bce", label_smoothing=0.2)(logits, targets)
    # y -> y * 0.8 + 0.1: 1 -> 0.9, 0 -> 0.1
    expected = (_bce(2, 0.9) + _bce(-1, 0.1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_multilabel_criterion("bce", label_smoothing=1.0)


def test_bce_pos_weight_scales_positive_term_only():
    logits = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = build_multilabel_criterion("bce", pos_weight=torch.tensor([1.0, 3.0]))(logits, targets)
    expected = (_bce(0.3, 1) + _bce(0.3, 1, 3.0) + 2 * _bce(0.3, 0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_auto_pos_weight_negatives_over_positives_clamped():
    # N = 1000: 100 positives -> 9; 500 -> 1; 1 -> 999 clamped to 100; 0 -> 1; 1000 -> 0 clamped to 0.01
    w = auto_pos_weight([100, 500, 1, 0, 1000], 1000)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([9.0, 1.0, MAX_POS_WEIGHT, 1.0, 1 / MAX_POS_WEIGHT])
    crit = build_multilabel_criterion("bce", pos_weight="auto", class_counts=[100, 500], num_samples=1000)
    assert crit.pos_weight.tolist() == pytest.approx([9.0, 1.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"pos_weight": "auto"}, "class_counts"),
    ({"pos_weight": "auto", "class_counts": [5, 20], "num_samples": 10}, r"\[0, num_samples=10\]"),
    ({"pos_weight": "auto", "class_counts": [-1], "num_samples": 10}, "class counts"),
    ({"pos_weight": "balanced"}, "'auto'"),
    ({"pos_weight": torch.tensor([1.0, 0.0])}, "> 0"),
    ({"pos_weight": torch.tensor([1.0, 2.0]), "class_counts": [1, 2, 3]}, "3 classes"),
    ({"kind": "focal"}, "bce"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_multilabel_criterion(**kwargs)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        SmoothedBCEWithLogits()(torch.zeros(2, 3), torch.zeros(2, 2))


def test_soft_targets_from_mixup_are_accepted():
    logits = torch.tensor([[0.0]])
    assert build_multilabel_criterion()(logits, torch.tensor([[0.3]])).item() == pytest.approx(math.log(2))


def test_asl_is_timms_with_mean_reduction():
    from timm.loss import AsymmetricLossMultiLabel

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, requires_grad=True)
    targets = (torch.rand(4, 3, generator=g) < 0.5).float()
    crit = build_multilabel_criterion("asl")
    assert isinstance(crit, AsymmetricLossMultiLabel)
    loss = crit(logits, targets)
    ref = AsymmetricLossMultiLabel(reduction="sum")(logits, targets) / logits.numel()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    # without focusing and clipping ASL is plain BCE: pos_weight and smoothing go through with the same meaning
    crit = build_multilabel_criterion("asl", pos_weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    crit.gamma_neg = crit.gamma_pos = 0
    crit.clip = 0
    bce = build_multilabel_criterion("bce", pos_weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    assert crit(logits, targets).item() == pytest.approx(bce(logits, targets).item(), rel=1e-5)
