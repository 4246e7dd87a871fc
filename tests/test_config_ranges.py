"""Every numeric config field refuses values outside its declared range: exit 2, one line naming the field.

The fields are read from the dataclasses (``trainer.config.fields.num`` metadata), so a field added later
with a range is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trainer.main as entry
from trainer.config.fields import field_range, type_hints
from trainer.config.loading import load_config
from trainer.config.schema import SECTIONS, Config, Phase

REPO = Path(__file__).resolve().parents[1]


def _numeric_fields():
    """``(override key, base type, Range, wrap)`` for every ranged field; ``wrap`` makes the override value."""
    out = []

    def walk(cls, prefix, wrap):
        for f in dataclasses.fields(cls):
            tp = type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}.{f.name}", wrap)
                continue
            rng = field_range(f)
            if rng is None:
                continue
            base = int if "int" in str(tp) else float
            out.append((f"{prefix}.{f.name}", base, rng, wrap))

    for name, cls in SECTIONS.items():
        walk(cls, name, None)
    # the fields of a phase, as an item of finetune.phases
    for f in dataclasses.fields(Phase):
        base = int if "int" in str(type_hints(Phase)[f.name]) else float
        out.append((f"finetune.phases[0].{f.name}", base, field_range(f), f.name))
    return out


FIELDS = _numeric_fields()


def _outside(base, rng):
    """Strategy of values outside ``rng`` (below the lower bound, above the upper one, or not finite)."""
    options = []
    if rng.ge is not None or rng.gt is not None:
        lo = rng.ge if rng.ge is not None else rng.gt
        if base is int:
            options.append(st.integers(max_value=math.ceil(lo), min_value=-10**12))
        else:
            options.append(st.floats(max_value=lo, exclude_max=rng.ge is not None, min_value=-1e12,
                                     allow_nan=False))
    if rng.le is not None or rng.lt is not None:
        hi = rng.le if rng.le is not None else rng.lt
        if base is int:
            options.append(st.integers(min_value=math.floor(hi), max_value=10**20))
        else:
            options.append(st.floats(min_value=hi, exclude_min=rng.le is not None, max_value=1e12, allow_nan=False))
    if base is float:
        options.append(st.sampled_from([math.inf, -math.inf, math.nan]))
    return st.one_of(options).filter(lambda x: not rng.contains(x))


def test_every_ranged_field_is_found():
    keys = {k for k, *_ in FIELDS}
    assert {"optim.lr", "optim.grad_clip", "optim.weight_decay", "data.shuffle_buffer",
            "train.checkpoint_every_steps", "train.early_stopping.patience", "finetune.layer_decay",
            "finetune.phases[0].lr_scale"} <= keys
    assert all(rng is not None for _, _, rng, _ in FIELDS)


def _overrides(key, value, wrap):
    if wrap is None:
        return {key: value}
    phase = {"start_epoch": 0, "train": "head", wrap: value}
    return {"finetune.phases": [phase]}


@pytest.fixture
def no_training(monkeypatch):
    """main() must stop at the config: a run that starts fails the test instead of training."""
    import trainer.train.start as start_mod

    def refuse(cfg, resolved=None):
        raise AssertionError("the config was accepted and training started")

    monkeypatch.setattr(start_mod, "run", refuse)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_values_outside_the_range_exit_2_naming_the_field(data, capfd, no_training):
    key, base, rng, wrap = data.draw(st.sampled_from(FIELDS), label="field")
    value = data.draw(_outside(base, rng), label="value")
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        entry.main(**_overrides(key, value, wrap))
    err = capfd.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and key in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("override,line", [
    ("--optim.grad_clip=-1", "optim.grad_clip: -1.0 is not allowed (allowed: > 0 or null)"),
    ("--optim.weight_decay=-0.5", "optim.weight_decay: -0.5 is not allowed (allowed: >= 0)"),
    ("--data.shuffle_buffer=-5", "data.shuffle_buffer: -5 is not allowed (allowed: >= 0)"),
    ("--train.checkpoint_every_steps=-2", "train.checkpoint_every_steps: -2 is not allowed (allowed: >= 0)"),
    ("--finetune.layer_decay=1.5", "finetune.layer_decay: 1.5 is not allowed (allowed: (0, 1] or null)"),
    ("--train.early_stopping.monitor=train/loss", "train.early_stopping.monitor: 'train/loss' is not allowed"),
    ("--finetune.phases=[{start_epoch: 1, train: head}]", "finetune.phases[0].start_epoch must be 0"),
    ("--model.backbone=resnet5", "model.backbone: 'resnet5' is not 'timm:<name>' nor a torchvision model name"),
])
def test_command_line_refusals_are_one_line_exit_2(override, line, tmp_path):
    r = subprocess.run([sys.executable, "trainer/main.py", override, f"--train.output_dir={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_and_enum_words_parse_as_meant(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5e-4\n  grad_clip: 1e0\n"
                 "train:\n  mixed_precision: no\n  resume: off\n  max_steps: 1e3\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4 and cfg.optim.grad_clip == 1.0
    assert cfg.train.mixed_precision == "no" and cfg.train.resume is False and cfg.train.max_steps == 1000
    # the same on the command line (fire hands strings or numbers)
    cfg = load_config(None, {"optim.lr": "5e-4", "train.mixed_precision": "no", "train.resume": "no"})
    assert cfg.optim.lr == 5e-4 and cfg.train.mixed_precision == "no" and cfg.train.resume is False
    cfg = load_config(None, {"train.mixed_precision": False})  # a YAML 1.1 boolean from elsewhere
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(Exception, match=r"train.max_steps: expected int, got 2.5"):
        load_config(None, {"train.max_steps": 2.5})


def test_defaults_are_inside_their_ranges():
    cfg = Config()
    for key, _, rng, wrap in FIELDS:
        if wrap is not None:
            continue
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj is None or rng.contains(obj), key
