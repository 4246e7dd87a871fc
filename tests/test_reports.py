"""Plots, error analysis and the predictions CSV of the best model (trainer/reporting/)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.realdata import (
    HYMENOPTERA,
    free_port,
    run_metrics,
    subset_folder,
    tiny_overrides,
)
from PIL import Image

from trainer.reporting import plots, predictions
from trainer.checkpoint.inference import read_model_meta

REPO = Path(__file__).resolve().parents[1]


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def fake_batches(n=40, c=3, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, bs):
        b = min(bs, n - s)
        out.append(({"key": [f"val/k{i:03d}" for i in range(s, s + b)],
                     "label": torch.randint(0, c, (b,), generator=g),
                     "image": torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g)},
                    torch.randn(b, c, generator=g) * 3))
    return out


class FakeAccelerator:
    num_processes, is_main_process = 2, True


def test_collector_split_over_ranks_equals_single_process(monkeypatch):
    batches = fake_batches()
    single = predictions.PredictionCollector(num_mistakes=5)
    ranks = [predictions.PredictionCollector(num_mistakes=5), predictions.PredictionCollector(num_mistakes=5)]
    for i, (batch, logits) in enumerate(batches):
        single(batch, logits)
        ranks[i % 2](batch, logits)  # the way EvalLoader deals batches to 2 ranks
    monkeypatch.setattr("accelerate.utils.gather_object", lambda objs: [r.local() for r in ranks])
    merged = ranks[0].gather(FakeAccelerator())
    ref = single.gather(None)
    assert merged.keys == ref.keys == sorted(ref.keys) and len(ref.keys) == 40
    assert np.array_equal(merged.labels, ref.labels) and np.array_equal(merged.topk, ref.topk)
    assert np.allclose(merged.topk_probs, ref.topk_probs) and np.allclose(merged.true_probs, ref.true_probs)
    assert [m.key for m in merged.mistakes] == [m.key for m in ref.mistakes]
    # the kept mistakes are the most confident wrong predictions, with their images
    wrong = ref.all_mistakes()
    assert [m.key for m in ref.mistakes] == [w[0] for w in wrong[:5]]
    assert all(m.image.shape == (3, 16, 16) and m.image.dtype == np.uint8 for m in ref.mistakes)
    # top-k only: k = min(5, C) classes per sample, most probable first, and the true class's probability
    assert ref.topk.shape == (40, 3) and (np.diff(ref.topk_probs, axis=1) <= 0).all()
    assert np.allclose(ref.topk_probs.sum(axis=1), 1.0, atol=1e-5)  # C = 3: the top-3 is everything
    hit = ref.topk == ref.labels[:, None]
    assert np.allclose(ref.topk_probs[hit], ref.true_probs)


def test_collector_keeps_topk_not_all_classes():
    col = predictions.PredictionCollector(topk=5)
    for batch, logits in fake_batches(n=64, c=1000):
        col(batch, logits)
    loc = col.local()
    assert loc["topk"].shape == (64, 5) and loc["topk_probs"].shape == (64, 5) and loc["true_probs"].shape == (64,)
    assert sum(v.nbytes for v in loc.values() if isinstance(v, np.ndarray)) < 64 * 100  # not 64 x 1000 floats


def test_gather_rejects_duplicate_keys(monkeypatch):
    batch, logits = fake_batches(n=8)[0]
    a, b = predictions.PredictionCollector(), predictions.PredictionCollector()
    a(batch, logits)
    b(batch, logits)
    monkeypatch.setattr("accelerate.utils.gather_object", lambda objs: [a.local(), b.local()])
    with pytest.raises(RuntimeError, match="duplicate key"):
        a.gather(FakeAccelerator())


def test_predictions_csv_has_every_sample_once(tmp_path):
    col = predictions.PredictionCollector()
    for batch, logits in fake_batches(n=20):
        col(batch, logits)
    pred = col.gather(None)
    path = predictions.write_predictions_csv(pred, ["a", "b", "c"], tmp_path / "p.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["key"] for r in rows] == pred.keys and len(rows) == 20
    for r, (batch_label, p) in zip(rows, zip(pred.labels, pred.topk_probs)):
        probs = [float(r[f"prob{i}"]) for i in (1, 2, 3)]
        assert probs == pytest.approx(p.tolist(), abs=1e-6) and probs == sorted(probs, reverse=True)
        assert r["pred"] == r["top1"] and float(r["prob"]) == probs[0]
        assert float(r["true_prob"]) == probs[[r["top1"], r["top2"], r["top3"]].index(r["true"])]


def test_plots_are_written_for_few_and_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    for c in (3, 100, 120):
        cm = rng.poisson(0.3, (c, c))
        cm[np.arange(c), np.arange(c)] += 10
        names = [f"class_{i}" for i in range(c)]
        w, h = png_size(plots.plot_confusion_matrix(cm, names, tmp_path / f"cm{c}.png"))
        t, p = np.nonzero(cm * (1 - np.eye(c, dtype=np.int64)))
        png_size(plots.plot_confused_pairs(np.stack([t, p, cm[t, p]], 1), cm.sum(1), names, tmp_path / f"cp{c}.png",
                                           title="sparse"))
        if c <= plots.MAX_MATRIX_CLASSES:  # a square matrix with >= 10 px per class at 100 dpi
            assert w >= 10 * c and h >= 10 * c
        else:  # the top-confused pairs chart
            assert h < 10 * c
        acc = (cm.diagonal() / cm.sum(1)).tolist()
        plots.plot_per_class_accuracy(acc, names, tmp_path / f"pc{c}.png", class_counts=cm.sum(1).tolist())
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        plots.plot_confusion_matrix(np.eye(2), ["a", "b", "c"], tmp_path / "bad.png")


def test_top_confused_pairs():
    # sparse (true, pred, count) rows of [[5, 3, 0], [1, 7, 4], [0, 0, 9]]
    rows = np.array([[0, 1, 3], [1, 0, 1], [1, 2, 4]])
    assert plots.top_confused_pairs(rows, [8, 12, 9], k=2) == [(1, 2, 4, 4 / 12), (0, 1, 3, 3 / 8)]


def test_reporter_writes_tables_each_evaluation_and_best_reports(tmp_path):
    from trainer.reporting.metrics import EvalAccumulator
    from trainer.reporting.reporter import Reporter

    class Main:
        num_processes, is_main_process = 1, True

    class Tables:
        def __init__(self):
            self.tables = {}

        def log_table(self, key, columns, rows, *, step):
            self.tables[key] = (columns, rows)

        def log_images(self, images, *, step):
            pass

    c, names = 150, [f"c{i}" for i in range(150)]
    tracker = Tables()
    rep = Reporter(tmp_path, names, Main(), tracker, max_table_rows=20)
    acc, col = EvalAccumulator(c), rep.collector()
    for batch, logits in fake_batches(n=300, c=c, bs=50):
        acc.update(logits, batch["label"])
        col(batch, logits)
    res = acc.reduce()
    rep.after_eval(res, col, improved=False, step=5)
    latest = tmp_path / "reports/latest"
    per_class = list(csv.DictReader((latest / "val_per_class.csv").open()))
    pairs = list(csv.DictReader((latest / "val_confused_pairs.csv").open()))
    assert len(per_class) == c and sum(int(r["support"]) for r in per_class) == 300
    assert sum(int(r["count"]) for r in pairs) + sum(int(r["correct"]) for r in per_class) == 300  # whole matrix
    assert [int(r["count"]) for r in pairs] == sorted((int(r["count"]) for r in pairs), reverse=True)
    assert len(tracker.tables["reports/val_per_class"][1]) == 20 and not (tmp_path / "reports/mistakes.png").exists()
    rep.after_eval(res, col, improved=True, step=5)
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "mistakes.png"):
        png_size(tmp_path / "reports" / name)
    assert (tmp_path / "reports/val_per_class.csv").read_text() == (latest / "val_per_class.csv").read_text()


def test_training_curves_from_a_resumed_metrics_file(tmp_path):
    m = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s, "lr/head": 1e-3, "lr/layer00": 1e-4} for s in (1, 2, 3)]
    rows += [{"step": 3, "val/loss": 0.5, "val/top1": 0.7, "val/balanced_acc": 0.6}]
    rows += [{"step": 3, "train/loss": 0.2, "lr/head": 1e-3, "lr/layer00": 1e-4}]  # logged again after resume
    m.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "train/lo')  # cut by a crash
    series = plots.read_metrics(m)
    steps, vals = series["train/loss"]
    assert steps.tolist() == [1, 2, 3] and vals.tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert plots._same_series(series, ["lr/head", "lr/layer00"]) == [["lr/head"], ["lr/layer00"]]
    w, h = png_size(plots.plot_training_curves(m, tmp_path / "curves.png"))
    assert w > 1000 and h > 300


def test_mistakes_grid_and_empty_grid(tmp_path):
    ms = [predictions.Mistake(prob=0.9 - i / 100, key=f"val/a/{i}", true=0, pred=1, true_prob=0.1,
                    image=np.full((3, 32, 32), 40 * i, dtype=np.uint8)) for i in range(6)]
    w, h = png_size(predictions.plot_mistakes(ms, ["ants", "bees"], tmp_path / "m.png", num_wrong=9, num_samples=50))
    assert w > 1000 and h > 500  # 4 columns x 2 rows of ~300 px panels
    png_size(predictions.plot_mistakes([], ["ants", "bees"], tmp_path / "none.png", num_wrong=0, num_samples=50))


# ---------------------------------------------------------------------------------------------
# real runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    root = tmp_path_factory.mktemp("rep")
    subset_folder(root / "images", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 7, "bees": 6}})
    return root


def val_keys(root):
    return sorted(f"val/{p.parent.name}/{p.stem}" for p in (root / "images/val").rglob("*.jpg"))


def check_reports(out: Path, keys: list[str]):
    rep = out / "reports"
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "mistakes.png", "training_curves.png"):
        png_size(rep / name)
    rows = list(csv.DictReader((rep / "val_predictions.csv").open()))
    assert [r["key"] for r in rows] == keys  # every val sample exactly once, sorted
    best = read_model_meta(out / "checkpoints/best")
    acc = sum(r["true"] == r["pred"] for r in rows) / len(rows)
    assert acc == pytest.approx(best["metrics"]["val/top1"], abs=1e-6)  # the CSV describes checkpoints/best
    for r in rows:
        assert float(r["prob1"]) + float(r["prob2"]) == pytest.approx(1.0, abs=2e-6)
    per_class = list(csv.DictReader((rep / "val_per_class.csv").open()))
    assert [r["class"] for r in per_class] == ["ants", "bees"]
    assert sum(int(r["correct"]) for r in per_class) / len(rows) == pytest.approx(acc, abs=1e-9)
    return best


@pytest.mark.slow
def test_run_writes_reports_of_the_best_checkpoint(data):
    from helpers.inprocess import run_in_process

    out = data / "run1"
    res = run_in_process(data / "images", data / "shards", out,
                         **{"train.epochs": 2, "train.early_stopping.monitor": "val/loss"})
    best = check_reports(out, val_keys(data))
    losses = [r["val/loss"] for r in run_metrics(out) if "val/loss" in r]
    assert len(losses) == 2 and best["metrics"]["val/loss"] == min(losses)  # best follows the monitor
    assert res.best_top1 == best["metrics"]["val/top1"]


@pytest.mark.slow
def test_two_rank_run_gathers_every_prediction_once(data):
    out = data / "ddp"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "trainer/main.py", "--config", "configs/ants_bees_lite0.yaml",
           *tiny_overrides(data / "images", data / "shards_ddp", out,
                           **{"train.epochs": 1, "optim.warmup_steps": 0, "train.eval_batch_size": 2})]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "world_size=2" in p.stderr
    check_reports(out, val_keys(data))  # 13 val samples over 2 ranks, eval batch 2: uneven split
