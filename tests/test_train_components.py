"""The Trainer as a composition of the parts built before it (trainer/train/components.py): the run's length,
the parts the Trainer and its checkpointer share, a new length from the budget keeper, the warm-up check."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
from trainer.train.components import RunLength, run_length

REPO = Path(__file__).resolve().parents[1]


def _cfg(**ov):
    return load_config(REPO / "configs/ants_bees_lite0.yaml", {"logging.wandb": "disabled", **ov})


@pytest.mark.parametrize("ov, expected", [
    ({"train.epochs": 3}, RunLength(schedule_steps=15, total_steps=15, num_epochs=3)),
    ({"train.epochs": 3, "train.max_steps": 7}, RunLength(schedule_steps=15, total_steps=7, num_epochs=3)),
    ({"train.steps": 12}, RunLength(schedule_steps=12, total_steps=12, num_epochs=3)),  # the last epoch partial
    ({"train.steps": 12, "train.max_steps": 20}, RunLength(schedule_steps=12, total_steps=12, num_epochs=3)),
])
def test_run_length_spans_the_configured_run_and_max_steps_only_stops_it(ov, expected):
    assert run_length(_cfg(**ov), steps_epoch=5) == expected


def _folder(root: Path, n: int) -> None:
    for split, count in (("train", n), ("val", 4)):
        for k, (cls, c) in enumerate({"red": (220, 40, 40), "blue": (40, 40, 220)}.items()):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng(1000 * k + i + (0 if split == "train" else 500))
                arr = np.clip(np.array(c) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=95)
                (d / f"{cls}_{i}.jpg").write_bytes(buf.getvalue())


def _tiny_cfg(tmp: Path, **ov):
    return _cfg(**{"data.root": str(tmp / "img"), "data.shard_dir": str(tmp / "shards"), "data.samples_per_shard": 8,
                   "data.num_workers": 1, "data.image_size": 32, "train.output_dir": str(tmp / "run"),
                   "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.epochs": 2,
                   "train.mixed_precision": "no", "optim.warmup_steps": 0, "logging.progress": False, **ov})


def test_trainer_shares_its_parts_and_a_new_length_replaces_the_old(tmp_path):
    from trainer.train.trainer import Trainer

    _folder(tmp_path / "img", n=12)  # 24 train images, global batch 8: 3 steps per epoch
    t = Trainer(_tiny_cfg(tmp_path, **{"train.ema_decay": 0.9}))
    try:
        assert t.steps_epoch == t.data.steps_epoch == 3 and t.class_names == ["blue", "red"]
        assert (t.total_steps, t.schedule_steps, t.num_epochs) == (6, 6, 2)
        # one model / optimizer / EMA: what trains is what the checkpointer saves and restores
        assert t.model is t.parts.model is t.ckpt.model and t.optimizer is t.parts.optimizer is t.ckpt.optimizer
        assert t.ema is t.parts.ema is not None and t.fcache is None and t.data.keeper is None
        assert t.model.preprocessing.input_size == 32 and t.loaders.eval_batch_size >= 1
        assert t.tracker is t.logs.tracker and (tmp_path / "run/config.yaml").is_file()
        # the budget keeper's new count: the length, the config and the checkpointer's config follow it
        t.launch = dataclasses.replace(t.launch, run_plan=SimpleNamespace(overrides={}))
        t.set_length(4)
        assert (t.total_steps, t.schedule_steps, t.num_epochs) == (4, 4, 2)
        assert t.cfg.train.steps == 4 and t.ckpt.cfg is t.cfg
        assert load_config(tmp_path / "run/config.yaml").train.steps == 4
    finally:
        t.tracker.close()


def test_a_warm_up_longer_than_the_run_is_refused_naming_the_field(tmp_path):
    from trainer.train.trainer import Trainer

    _folder(tmp_path / "img", n=4)  # 8 train images: 1 step per epoch, 2 in the run
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps \(3\) is longer than the whole run \(2 steps"):
        Trainer(_tiny_cfg(tmp_path, **{"optim.warmup_steps": 3}))
