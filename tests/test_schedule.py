"""Tests for trainer/finetune/schedule.py (pure)."""

import math

import pytest

from trainer.finetune.schedule import (
    Phase,
    build_phases,
    group_lr,
    lr_factor,
    phase_index_at,
)


def test_lr_factor_warmup_then_cosine():
    total, warm = 110, 10
    assert lr_factor(0, total, warm) == pytest.approx(0.1)
    assert lr_factor(4, total, warm) == pytest.approx(0.5)
    assert lr_factor(9, total, warm) == pytest.approx(1.0)
    assert lr_factor(10, total, warm) == pytest.approx(1.0)
    assert lr_factor(60, total, warm) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(35, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, total, warm) == pytest.approx(0.0)
    assert lr_factor(500, total, warm) == pytest.approx(0.0)
    vals = [lr_factor(s, total, warm) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_factor(110, total, warm, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(60, total, warm, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(0, 5, 0) == pytest.approx(1.0)
    assert lr_factor(4, 5, 5) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=-1, total_steps=10, warmup_steps=0), "step"),
    (dict(step=0, total_steps=0, warmup_steps=0), "total_steps"),
    (dict(step=0, total_steps=10, warmup_steps=11), "optim.warmup_steps"),
    (dict(step=0, total_steps=10, warmup_steps=1, min_lr_ratio=1.5), "optim.min_lr_ratio"),
])
def test_lr_factor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(**kwargs)


def test_build_phases_simple_modes():
    assert build_phases(freeze="backbone", num_backbone_layers=5, epochs=3) == [Phase(0, "head")]
    assert build_phases(freeze="none", num_backbone_layers=5, epochs=3) == [Phase(0, "all")]


def test_build_phases_gradual():
    ph = build_phases(gradual_every=2, gradual_start_epoch=1, num_backbone_layers=3, epochs=10,
                      unfreeze_warmup_steps=7, unfrozen_lr_scale=0.1)
    assert ph == [Phase(0, "head"), Phase(1, 1, 0.1, 7), Phase(3, 2, 0.1, 7), Phase(5, "all", 0.1, 7)]
    # cut by the number of epochs
    ph = build_phases(gradual_every=3, gradual_start_epoch=2, num_backbone_layers=8, epochs=9)
    assert [(p.start_epoch, p.train) for p in ph] == [(0, "head"), (2, 1), (5, 2), (8, 3)]
    # start at 0: no head-only phase, no re-warmup at epoch 0
    ph = build_phases(gradual_every=1, gradual_start_epoch=0, num_backbone_layers=2, epochs=5,
                      unfreeze_warmup_steps=4)
    assert ph == [Phase(0, 1, 1.0, 0), Phase(1, "all", 1.0, 4)]
    assert [phase_index_at(ph, e) for e in range(5)] == [0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="finetune.gradual_every"):
        build_phases(freeze="none", gradual_every=1, num_backbone_layers=2, epochs=5)


def test_build_phases_explicit_and_defaults():
    ph = build_phases(phases=[{"start_epoch": 0, "train": "head"},
                              {"start_epoch": 2, "train": "all", "lr_scale": 0.1}],
                      num_backbone_layers=5, epochs=4, unfreeze_warmup_steps=3, unfrozen_lr_scale=0.5)
    assert ph == [Phase(0, "head", 0.5, 0), Phase(2, "all", 0.1, 3)]
    assert [phase_index_at(ph, e) for e in range(4)] == [0, 0, 1, 1]
    # the reverse (all, then head) is allowed
    ph = build_phases(phases=[{"start_epoch": 0, "train": "all"}, {"start_epoch": 1, "train": "head"}],
                      num_backbone_layers=5, epochs=2)
    assert [p.train for p in ph] == ["all", "head"]


@pytest.mark.parametrize("phases,match", [
    ([], r"finetune.phases must be"),
    ([{"start_epoch": 1, "train": "head"}], r"finetune.phases\[0\].start_epoch must be 0"),
    ([{"start_epoch": 0, "train": "head"}, {"start_epoch": 2, "train": "most"}], r"finetune.phases\[1\].train"),
    ([{"start_epoch": 0, "train": "head"}, {"start_epoch": 2, "train": 9}], r"finetune.phases\[1\].train 9"),
    ([{"start_epoch": 0, "train": "head"}, {"start_epoch": 0, "train": 2}], r"finetune.phases\[1\].start_epoch"),
    ([{"start_epoch": 0, "train": "head"}, {"start_epoch": 5, "train": 2}], r"train.epochs"),
    ([{"start_epoch": 0, "train": "head", "lr": 1}], r"finetune.phases\[0\]: unknown key"),
    ([{"start_epoch": 0}], r"finetune.phases\[0\].train is required"),
    ([{"start_epoch": 0, "train": "all", "lr_scale": 0}], r"finetune.phases\[0\].lr_scale"),
    ([{"start_epoch": 0, "train": "all", "warmup_steps": -1}], r"finetune.phases\[0\].warmup_steps"),
])
def test_build_phases_validation(phases, match):
    with pytest.raises(ValueError, match=match):
        build_phases(phases=phases, num_backbone_layers=5, epochs=5)


def test_build_phases_field_errors():
    with pytest.raises(ValueError, match="finetune.freeze"):
        build_phases(freeze="all", num_backbone_layers=5, epochs=5)
    with pytest.raises(ValueError, match="finetune.phases and finetune.gradual_every"):
        build_phases(phases=[{"start_epoch": 0, "train": "head"}], gradual_every=1, num_backbone_layers=5, epochs=5)
    with pytest.raises(ValueError, match="finetune.freeze='none'"):
        build_phases(freeze="none", phases=[{"start_epoch": 0, "train": "head"}], num_backbone_layers=5, epochs=5)
    with pytest.raises(ValueError, match="finetune.unfrozen_lr_scale"):
        build_phases(num_backbone_layers=5, epochs=5, unfrozen_lr_scale=0)


def test_group_lr():
    total, warm = 100, 10
    phase = Phase(2, "all", lr_scale=0.1, warmup_steps=4)
    start = 40
    base = 1e-3
    g = lr_factor(41, total, warm)
    assert group_lr(base, 0.5, 41, total, warm, phase, start, is_head=True) == pytest.approx(base * g * 0.5)
    backbone = group_lr(base, 0.5, 41, total, warm, phase, start, is_head=False)
    assert backbone == pytest.approx(base * g * 0.5 * 0.1 * 0.5)  # x phase scale x re-warmup 2/4
    g = lr_factor(60, total, warm, min_lr_ratio=0.2)
    assert group_lr(base, 1.0, 60, total, warm, phase, start, 0.2, is_head=False) == pytest.approx(base * g * 0.1)
    no_warm = Phase(0, "all")
    assert group_lr(base, 1.0, 0, total, warm, no_warm, 0, is_head=False) == pytest.approx(base * 0.1)
    with pytest.raises(ValueError, match="before the phase start"):
        group_lr(base, 1.0, 39, total, warm, phase, start, is_head=False)


def test_phase_index_at_errors():
    with pytest.raises(ValueError):
        phase_index_at([], 0)
    with pytest.raises(ValueError):
        phase_index_at([Phase(1, "all")], 1)
    with pytest.raises(ValueError, match="Phase.train"):
        Phase(0, "most")
