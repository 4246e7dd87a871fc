"""Tests for trainer/finetune/schedule.py (pure)."""

import math

import pytest

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
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
    (dict(step=0, total_steps=10, warmup_steps=1, min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_lr_factor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(**kwargs)


def test_build_phases_simple_modes():
    assert build_phases(freeze="backbone", num_backbone_layers=5, epochs=3) == [Phase(0, "head", 1.0, 0)]
    assert build_phases(freeze="none", num_backbone_layers=5, epochs=3) == [Phase(0, "all", 1.0, 0)]


def test_build_phases_gradual():
    ph = build_phases(gradual_every=2, gradual_start_epoch=1, num_backbone_layers=3, epochs=10,
                      unfreeze_warmup_steps=7, unfrozen_lr_scale=0.1)
    assert ph == [Phase(0, "head", 1.0, 0), Phase(1, 1, 0.1, 7), Phase(3, 2, 0.1, 7), Phase(5, "all", 0.1, 7)]
    # cut by the number of epochs
    ph = build_phases(gradual_every=3, gradual_start_epoch=2, num_backbone_layers=8, epochs=9)
    assert [(p.start_epoch, p.train) for p in ph] == [(0, "head"), (2, 1), (5, 2), (8, 3)]
    # start at 0: no head-only phase, no re-warmup at epoch 0
    ph = build_phases(gradual_every=1, gradual_start_epoch=0, num_backbone_layers=2, epochs=5,
                      unfreeze_warmup_steps=4)
    assert ph == [Phase(0, 1, 1.0, 0), Phase(1, "all", 1.0, 4)]
    assert [phase_index_at(ph, e) for e in range(5)] == [0, 1, 1, 1, 1]


def test_build_phases_explicit_and_defaults():
    ph = build_phases(phases=[Phase(0, "head"), Phase(2, "all", lr_scale=0.1)],
                      num_backbone_layers=5, epochs=4, unfreeze_warmup_steps=3, unfrozen_lr_scale=0.5)
    assert ph == [Phase(0, "head", 0.5, 0), Phase(2, "all", 0.1, 3)]
    assert [phase_index_at(ph, e) for e in range(4)] == [0, 0, 1, 1]
    # the reverse (all, then head) is allowed
    ph = build_phases(phases=[Phase(0, "all"), Phase(1, "head")], num_backbone_layers=5, epochs=2)
    assert [p.train for p in ph] == ["all", "head"]
    # a layer count known only from the model
    with pytest.raises(ConfigError, match=r"finetune.phases\[1\].train 9"):
        build_phases(phases=[Phase(0, "head"), Phase(2, 9)], num_backbone_layers=5, epochs=5)


PH = "{start_epoch: 0, train: head}"


@pytest.mark.parametrize("overrides,match", [
    ({"finetune.phases": "[]"}, r"finetune.phases: \[\] is not allowed"),
    ({"finetune.phases": "[{start_epoch: 1, train: head}]"}, r"finetune.phases\[0\].start_epoch must be 0"),
    ({"finetune.phases": f"[{PH}, {{start_epoch: 2, train: most}}]"}, r"finetune.phases\[1\].train"),
    ({"finetune.phases": f"[{PH}, {{start_epoch: 0, train: 2}}]"}, r"finetune.phases\[1\].start_epoch"),
    ({"finetune.phases": f"[{PH}, {{start_epoch: 5, train: 2}}]", "train.epochs": 5}, r"train.epochs"),
    ({"finetune.phases": "[{start_epoch: 0, train: head, lr: 1}]"}, r"'finetune.phases\[0\].lr'"),
    ({"finetune.phases": "[{start_epoch: 0}]"}, r"finetune.phases\[0\]: .*train"),
    ({"finetune.phases": "[{start_epoch: 0, train: all, lr_scale: 0}]"}, r"finetune.phases\[0\].lr_scale: 0.0"),
    ({"finetune.phases": "[{start_epoch: 0, train: all, warmup_steps: -1}]"}, r"finetune.phases\[0\].warmup_steps"),
    ({"finetune.phases": "[head]"}, r"finetune.phases\[0\]: expected a mapping"),
    ({"finetune.freeze": "all"}, "finetune.freeze"),
    ({"finetune.phases": f"[{PH}]", "finetune.gradual_every": 1}, "finetune.phases and finetune.gradual_every"),
    ({"finetune.phases": f"[{PH}]", "finetune.freeze": "none"}, "finetune.freeze='none'"),
    ({"finetune.gradual_every": 1, "finetune.freeze": "none"}, "finetune.gradual_every needs"),
    ({"finetune.unfrozen_lr_scale": 0}, "finetune.unfrozen_lr_scale"),
])
def test_phase_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


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
    no_warm = Phase(0, "all", 1.0, 0)
    assert group_lr(base, 1.0, 0, total, warm, no_warm, 0, is_head=False) == pytest.approx(base * 0.1)
    with pytest.raises(ValueError, match="before the phase start"):
        group_lr(base, 1.0, 39, total, warm, phase, start, is_head=False)


def test_phase_index_at_errors():
    with pytest.raises(ValueError):
        phase_index_at([], 0)
    with pytest.raises(ValueError):
        phase_index_at([Phase(1, "all")], 1)
    with pytest.raises(ConfigError, match=r"finetune.phases\[i\].train"):
        Phase(0, "most")
