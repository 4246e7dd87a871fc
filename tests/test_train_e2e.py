"""End-to-end runs of trainer/main.py on real images: single process, 2-process DDP, predict, bad configs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.realdata import (
    HYMENOPTERA,
    free_port,
    run_metrics,
    subset_folder,
    tiny_overrides,
)

from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint.inference import read_model_meta

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE = str(Path(PY).parent / "accelerate")

pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")


def run_cmd(args, timeout=420, check=True):
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    subset_folder(root / "images", {"train": {"ants": 16, "bees": 16}, "val": {"ants": 12, "bees": 12}})
    return root


@pytest.mark.slow
def test_single_process_run_on_real_images_then_predict(data):
    out = data / "run1"
    run_cmd([PY, "trainer/main.py", "--config", "configs/ants_bees_lite0.yaml",
             *tiny_overrides(data / "images", data / "shards", out, **{"train.epochs": 2,
                                                                        # predict.py --precision fp32: the
                                                                        # same numerics as the val top-1
                                                                        "train.mixed_precision": "no"})])
    rows = run_metrics(out)
    evals = [r for r in rows if "val/top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(r["val/num_samples"] == 24 for r in evals)
    assert evals[-1]["val/top1"] >= 0.8  # frozen ImageNet Lite0 features separate ants from bees
    assert any("train/images_per_s" in r for r in rows)
    assert (out / "config.yaml").is_file()
    best = read_model_meta(out / "checkpoints/best")
    assert best["class_names"] == ["ants", "bees"] and best["backbone"] == "timm:tf_efficientnet_lite0"
    assert best["preprocessing"]["mean"] == [0.5, 0.5, 0.5] or tuple(best["preprocessing"]["mean"]) == (0.5,) * 3

    # predict.py with the best checkpoint labels the val images with the accuracy measured in training
    csv_path = data / "pred.csv"
    p = run_cmd([PY, "launch/predict.py", "--checkpoint", str(out / "checkpoints/best"),
                 "--images", str(data / "images/val"), "--out", str(csv_path), "--topk", "2",
                 "--precision", "fp32"])
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    acc = sum(r["true"] == r["pred"] for r in rows) / len(rows)
    assert acc == pytest.approx(best["metrics"]["val/top1"], abs=1e-6)
    assert {r["top2"] for r in rows} <= {"ants", "bees"} and f"{acc:.4f}" in p.stdout


@pytest.mark.slow
def test_two_process_ddp_run_keeps_replicas_identical(data):
    out = data / "run_ddp"
    p = run_cmd([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                 "trainer/main.py",
                 "--config", "configs/ants_bees_lite0_finetune.yaml",
                 *tiny_overrides(data / "images", data / "shards", out,
                                 **{"train.epochs": 1, "train.max_steps": 3, "optim.warmup_steps": 1})])
    assert "world_size=2" in p.stderr
    rows = run_metrics(out)
    ev = [r for r in rows if "val/top1" in r][-1]
    assert ev["val/num_samples"] == 24  # every val sample counted exactly once across ranks
    assert ev["ddp/replica_max_abs_diff"] == 0.0
    # weights really moved (fine-tuning everything): compare with the pretrained backbone
    from trainer.models.build import build_model
    ref, _ = build_model("timm:tf_efficientnet_lite0", 2, "package:efficientnet-lite0")
    last = ckpt_lib.load(out / "checkpoints/last.pt")
    moved = [k for k, v in ref.state_dict().items() if k.startswith("backbone.") and v.is_floating_point()
             and not torch.equal(v, last["model"][k])]
    assert len(moved) > 100 and last["step"] == 3


def _config_error(args, tmp_path) -> str:
    p = run_cmd([PY, "trainer/main.py", *args], check=False, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.mark.slow  # four CLI runs
def test_bad_configs_end_with_one_clear_message(tmp_path):
    base = ["--config", "configs/ants_bees_lite0.yaml", "--logging.wandb=disabled"]
    assert "optim.lrr" in _config_error(base + ["--optim.lrr=0.1"], tmp_path)
    assert "train.epochs: expected int" in _config_error(base + ["--train.epochs=two"], tmp_path)
    msg = _config_error(base + [f"--data.root={tmp_path}/nope", f"--data.shard_dir={tmp_path}/s",
                                "--data.download_url=null"], tmp_path)
    assert "data.root" in msg and "nope" in msg
    assert "config file not found" in _config_error(["--config", str(tmp_path / "x.yaml")], tmp_path)


@pytest.mark.slow
def test_other_data_into_a_run_folder_is_refused_naming_the_keys(data, tmp_path):
    out = tmp_path / "run"
    run_cmd([PY, "trainer/main.py", "--config", "configs/ants_bees_lite0.yaml",
             *tiny_overrides(data / "images", data / "shards", out, **{"train.max_steps": 1})])
    three = subset_folder(tmp_path / "three", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}})
    for split in ("train", "val"):  # a third class
        (three / split / "wasps").mkdir()
        for p in sorted((three / split / "ants").iterdir())[:4]:
            (three / split / "wasps" / p.name).write_bytes(p.read_bytes())
    msg = _config_error(["--config", "configs/ants_bees_lite0.yaml",
                         *tiny_overrides(three, tmp_path / "shards3", out, **{"train.max_steps": 1})], tmp_path)
    # other data into the same run folder: refused before any work, naming the changed keys
    assert "last.pt" in msg and "data.root" in msg and "data.shard_dir" in msg
