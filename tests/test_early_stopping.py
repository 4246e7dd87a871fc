"""Early stopping on a monitored metric (trainer/train/early_stopping.py) and its use in trainer/train/trainer.py."""

from __future__ import annotations

import json

import pytest
from helpers.realdata import HYMENOPTERA, run_metrics, subset_folder

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
from trainer.checkpoint import state as ckpt_lib
from trainer.train.early_stopping import EarlyStopping
from trainer.checkpoint.inference import read_model_meta


def feed(es, values, key="val/top1"):
    return [es.update({key: v}, step=i, epoch=i) for i, v in enumerate(values)]


def test_patience_counts_evaluations_without_improvement():
    es = EarlyStopping(monitor="val/top1", patience=2)
    assert es.mode == "max"
    assert feed(es, [0.5, 0.6, 0.6, 0.55]) == [True, True, False, False]
    assert es.should_stop and es.best == 0.6 and es.best_epoch == 1 and es.wait == 2


def test_improvement_resets_the_counter_and_min_delta_is_required():
    es = EarlyStopping(monitor="val/top1", patience=2, min_delta=0.05)
    # 0.54 and 0.58 are within min_delta of 0.5 / of each other's best -> no improvement
    assert feed(es, [0.5, 0.54, 0.56, 0.58]) == [True, False, True, False]
    assert not es.should_stop and es.best == 0.56 and es.wait == 1
    es.update({"val/top1": 0.6})
    assert es.should_stop


def test_min_mode_for_losses_and_nan_never_improves():
    es = EarlyStopping(monitor="val/loss", patience=1)
    assert es.mode == "min"  # auto
    assert feed(es, [1.0, 0.8], "val/loss") == [True, True]
    assert es.update({"val/loss": float("nan")}) is False and es.should_stop
    es = EarlyStopping(monitor="val/loss", mode="max")
    assert feed(es, [1.0, 0.8, 1.2], "val/loss") == [True, False, True]
    assert EarlyStopping(patience=None).update({"val/top1": 0.1}) and not EarlyStopping().should_stop


def test_missing_metric_and_bad_arguments_are_named():
    with pytest.raises(KeyError, match="val/top5"):
        EarlyStopping(monitor="val/top5").update({"val/top1": 0.5, "val/loss": 1.0})
    with pytest.raises(ConfigError, match="train.early_stopping.patience: 0 is not allowed"):
        load_config(None, {"train.early_stopping.patience": 0})
    with pytest.raises(ConfigError, match="train.early_stopping.monitor"):
        load_config(None, {"train.early_stopping.monitor": "train/loss"})
    with pytest.raises(ConfigError, match="train.early_stopping.mode"):
        load_config(None, {"train.early_stopping.mode": "up"})
    cfg = load_config(None, {"train.early_stopping": {"monitor": "val/loss", "patience": 3, "min_delta": 0.01}})
    es = EarlyStopping.from_config(cfg.train.early_stopping)
    assert (es.monitor, es.mode, es.patience, es.min_delta) == ("val/loss", "min", 3, 0.01)


def test_state_round_trip_continues_counting():
    a = EarlyStopping(patience=3)
    feed(a, [0.5, 0.4, 0.45])
    b = EarlyStopping(patience=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert (b.best, b.wait, b.best_epoch) == (0.5, 2, 0)
    b.update({"val/top1": 0.5})
    assert b.should_stop
    # a stopped run continues when resumed with more patience; another metric restarts the count
    c = EarlyStopping(patience=5)
    c.load_state_dict(b.state_dict())
    assert not c.should_stop and c.wait == 3
    d = EarlyStopping(monitor="val/loss", patience=3)
    d.load_state_dict(b.state_dict())
    assert d.best is None and d.wait == 0


# ---------------------------------------------------------------------------------------------
# in a real run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    root = tmp_path_factory.mktemp("es")
    subset_folder(root / "images", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}})
    return root


def val_records(out):
    return [r for r in run_metrics(out) if "val/top1" in r]


# min_delta 10 on the val loss: only the first evaluation can improve -> stops after 1 + patience epochs
NO_IMPROVEMENT = {"train.epochs": 6, "train.early_stopping.monitor": "val/loss",
                  "train.early_stopping.patience": 2, "train.early_stopping.min_delta": 10.0}


@pytest.mark.slow
def test_run_stops_early_and_keeps_the_best_checkpoint(tiny):
    from helpers.inprocess import run_in_process

    out = tiny / "stop"
    res = run_in_process(tiny / "images", tiny / "shards", out, **NO_IMPROVEMENT)
    assert res.early_stopped and res.epoch == 3 and res.step == 6  # 2 steps per epoch
    assert [r["epoch"] for r in val_records(out)] == [1, 2, 3]
    best = read_model_meta(out / "checkpoints/best")
    assert best["metrics"]["epoch"] == 1 and best["metrics"]["val/loss"] == val_records(out)[0]["val/loss"]
    last = ckpt_lib.load(out / "checkpoints/last.pt")
    assert last["early_stopping"]["wait"] == 2 and last["early_stopping"]["best_epoch"] == 1


@pytest.mark.slow
def test_early_stopping_state_survives_resume(tiny):
    """Stopped by max_steps after epoch 2 (1 evaluation without improvement), then resumed: the
    resumed run stops after one more epoch (a lost state would restart counting and run to epoch 5);
    running it again does nothing."""
    from helpers.inprocess import run_in_process

    out = tiny / "resume"
    first = run_in_process(tiny / "images", tiny / "shards", out, **NO_IMPROVEMENT, **{"train.max_steps": 4})
    assert not first.early_stopped and first.epoch == 2
    second = run_in_process(tiny / "images", tiny / "shards", out, **NO_IMPROVEMENT)
    assert second.early_stopped and second.epoch == 3 and second.step == 6
    assert [r["epoch"] for r in val_records(out)] == [1, 2, 3]
    third = run_in_process(tiny / "images", tiny / "shards", out, **NO_IMPROVEMENT)
    assert third.early_stopped and third.step == 6 and len(val_records(out)) == 3
