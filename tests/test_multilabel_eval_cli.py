"""Multi-label evaluate and reports (issue 26): ``launch/evaluate.py`` on a multi-label checkpoint (manifest, shards,
``--threshold``, refusals), the thresholds chosen on val, metrics equal on 1 and 2 ranks, the precision-recall curves
from the score histograms, the worst-predictions collector, and the report PNGs of a run and of an evaluation."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data_synth import colour_label_set, write_colour_manifest
from helpers.fake_accelerator import CpuAccelerator

from trainer.reporting.multilabel_eval import BIN_EDGES, MultiLabelAccumulator
from trainer.reporting.multilabel_plots import LabelSetCollector, pr_curve

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["blue", "green", "red"]
PNGS = ("ap_per_class.png", "pr_curves.png", "mistakes.png")
METRICS = ("loss", "mAP", "mAP_micro", "f1_micro", "f1_macro", "exact_set_accuracy", "hamming_loss", "num_samples")


class MainAccelerator(CpuAccelerator):
    """The CPU stand-in as the main (only) process."""

    is_main_process = True
    process_index = 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of a tiny timm model (``timm:test_efficientnet``, no pretrained weights) on a multi-label manifest
    of 32 px uniform JPEGs (label set = the colour channels above 127): 40 train, 24 val, 16 test rows."""
    from trainer.config.loading import load_config
    from trainer.train.start import run as start_run

    tmp = tmp_path_factory.mktemp("mlrun")
    root = tmp / "data"
    write_colour_manifest(root, ["train"] * 40 + ["val"] * 24 + ["test"] * 16)
    out = tmp / "run"
    cfg = load_config(None, {
        "data.manifest": str(root / "all.csv"), "data.task": "multilabel", "data.shard_dir": str(tmp / "shards"),
        "data.num_workers": 0, "data.augment": "none", "data.image_size": 32,
        "model.backbone": "timm:test_efficientnet", "model.weights": "none", "finetune.freeze": "none",
        "optim.lr": 0.02, "optim.warmup_steps": 0, "train.epochs": 1, "train.global_batch_size": 8,
        "train.micro_batch_size": 8, "train.output_dir": str(out), "logging.wandb": "disabled",
        "logging.progress": False})
    start_run(cfg)
    return {"root": root, "manifest": root / "all.csv", "shards": tmp / "shards", "out": out,
            "best": out / "checkpoints" / "best"}


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100, (path, im.format, im.size)
        im.verify()


def _per_class(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _val_shards(run) -> list[str]:
    from trainer.data.meta import read_meta

    return read_meta(run["shards"]).shard_urls("val")


# ---- precision-recall curves and the worst-predictions collector (synthetic, fast) ---------------------------------


def _synthetic(n: int = 500, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, c, generator=g) < torch.linspace(0.15, 0.5, c)).float()
    return 2.0 * (y - 0.5) * torch.linspace(0.5, 2.5, c) + 1.5 * torch.randn(n, c, generator=g), y


def test_pr_curve_from_the_histograms_is_thresholding_the_probabilities_at_each_edge():
    logits, y = _synthetic()
    acc = MultiLabelAccumulator(y.shape[1])
    for i in range(0, len(y), 64):
        acc.update(logits[i:i + 64], y[i:i + 64])
    res = acc.reduce()
    probs = torch.sigmoid(logits.float())
    for c in range(y.shape[1]):
        recall, precision, thresholds = pr_curve(res.pos_hist[c], res.neg_hist[c])
        assert len(recall) > 10 and np.all(np.diff(recall) >= 0) and np.all(np.diff(thresholds) < 0)
        positives = int(y[:, c].sum())
        for r, p, t in zip(recall, precision, thresholds):  # every point: p >= edge on the raw probabilities
            pred = probs[:, c] >= torch.tensor(t, dtype=torch.float32)
            tp = int((pred & (y[:, c] > 0)).sum())
            assert (r, p) == (tp / positives, tp / int(pred.sum())), (c, t)
        assert float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision)) == pytest.approx(res.ap[c],
                                                                                                   abs=1e-12)
    assert set(thresholds.tolist()) <= set(BIN_EDGES.double().tolist())
    empty = pr_curve(np.zeros(5, dtype=np.int64), np.ones(5, dtype=np.int64))
    assert all(a.size == 0 for a in empty)
    with pytest.raises(ValueError, match="pr_curve"):
        pr_curve(np.zeros(3), np.zeros(4))


def _batches(logits, y, bs=16):
    for i in range(0, len(y), bs):
        n = min(bs, len(y) - i)
        yield ({"key": [f"s{i + j:04d}" for j in range(n)], "label": y[i:i + n],
                "image": torch.full((n, 3, 4, 4), i % 255, dtype=torch.uint8)}, logits[i:i + n])


def test_collector_keeps_the_worst_predictions_whatever_the_split_over_ranks(monkeypatch):
    import accelerate.utils

    logits, y = _synthetic(n=300)
    t = [0.5, 0.4, 0.6, 0.5]
    probs = torch.sigmoid(logits)
    wrong = ((probs >= torch.tensor(t)) != (y > 0.5)).sum(1)
    err = (y - probs).abs().sum(1)
    keys = [f"s{i:04d}" for i in range(len(y))]
    expected = sorted(range(len(y)), key=lambda i: (-int(wrong[i]), -float(err[i]), keys[i]))[:7]

    one = LabelSetCollector(7, thresholds=t)
    for batch, lg in _batches(logits, y):
        one(batch, lg)
    got = one.gather()
    assert [m.key for m in got] == [keys[i] for i in expected]
    assert [m.wrong for m in got] == [int(wrong[i]) for i in expected]
    assert got[0].true == tuple(int(j) for j in torch.nonzero(y[expected[0]])[:, 0])
    assert got[0].image.shape == (3, 4, 4) and got[0].probs.shape == (4,)
    assert set(got[0].pred(t)) ^ set(got[0].true) and len(set(got[0].pred(t)) ^ set(got[0].true)) == got[0].wrong

    ranks = [LabelSetCollector(7, thresholds=t), LabelSetCollector(7, thresholds=t)]
    for k, (batch, lg) in enumerate(_batches(logits, y, bs=5)):  # interleaved batches, another batch size
        ranks[k % 2](batch, lg)
    other = [[e[2] for e in ranks[1]._heap]]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda parts: parts + other)
    two = type("Two", (), {"num_processes": 2, "is_main_process": True})()
    assert [m.key for m in ranks[0].gather(two)] == [keys[i] for i in expected]
    # thresholds unknown during the pass (a validation): kept by sum |y - p|, ordered by wrong labels afterwards
    blind = LabelSetCollector(5)
    for batch, lg in _batches(logits, y):
        blind(batch, lg)
    by_err = sorted(range(len(y)), key=lambda i: (-float(err[i]), keys[i]))[:5]
    kept = blind.gather(thresholds=t)
    assert {m.key for m in kept} == {keys[i] for i in by_err}
    assert [m.wrong for m in kept] == sorted((int(wrong[i]) for i in by_err), reverse=True)


# ---- a trained multi-label checkpoint ------------------------------------------------------------------------------


def test_run_writes_the_multilabel_reports_of_the_best_val_and_of_test(run):
    reports = run["out"] / "reports"
    for split in ("val", "test"):
        for name in PNGS:
            _check_png(reports / f"{split}_{name}")
        rows = _per_class(reports / f"{split}_per_class.csv")
        assert [r["class"] for r in rows] == CLASSES and {"fp", "fn", "tp", "ap", "threshold"} <= set(rows[0])


def test_thresholds_chosen_on_val_are_stable_and_those_saved_by_the_run(run):
    from trainer.train.evaluation import evaluate_model
    from trainer.checkpoint.inference import load_for_inference, read_model_meta

    model, pre, names = load_for_inference(run["best"])
    assert names == CLASSES
    shards, acc = _val_shards(run), MainAccelerator()
    first, second = (evaluate_model(model, pre, shards, class_names=names, accelerator=acc, num_workers=0,
                                    micro_batch_size=bs, multilabel=True, thresholds=None) for bs in (8, 5))
    assert first.thresholds_chosen and first.num_samples == 24
    assert first.thresholds.tolist() == second.thresholds.tolist()
    assert first.thresholds.tolist() == read_model_meta(run["best"])["thresholds"]


def test_evaluate_cli_on_a_multilabel_manifest_prints_and_writes_every_metric(run, tmp_path, capsys):
    from launch.evaluate import main
    from trainer.data.decode import decode_image_bytes
    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference, read_model_meta

    out = tmp_path / "eval"
    record = main(str(run["best"]), str(run["manifest"]), split="test", out_dir=str(out), num_workers=0)
    printed = capsys.readouterr().out
    for key in METRICS:
        assert f"test/{key}" in record
    for key in METRICS[:-1]:
        assert f"test/{key} " in printed, key
    assert record["test/num_samples"] == 16 and "thresholds: per class, saved in" in printed
    for name in CLASSES:
        assert any(line.split()[:1] == [name] and len(line.split()) == 7 for line in printed.splitlines()), name
    saved = json.loads((out / "reports" / "test_metrics.json").read_text())
    assert {k: saved[k] for k in record} == pytest.approx(record, nan_ok=True)
    for name in PNGS:
        _check_png(out / "reports" / f"test_{name}")
    assert not (out / ".shards-test").exists()

    # the reference: each test image through the checkpoint one by one, thresholded at the saved thresholds
    model, pre, _ = load_for_inference(run["best"])
    thresholds = torch.tensor(read_model_meta(run["best"])["thresholds"], dtype=torch.float32)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    test = [i for i in range(64, 80)]
    with torch.inference_mode():
        probs = torch.sigmoid(model(torch.stack([tf(decode_image_bytes(
            (run["root"] / f"img/{i:03d}.jpg").read_bytes())) for i in test])).float())
    y = torch.tensor([[n in colour_label_set(i) for n in CLASSES] for i in test])
    pred = probs >= thresholds
    rows = _per_class(out / "reports" / "test_per_class.csv")
    assert [int(r["fp"]) for r in rows] == (pred & ~y).sum(0).tolist()
    assert [int(r["fn"]) for r in rows] == (~pred & y).sum(0).tolist()
    assert [int(r["support"]) for r in rows] == y.sum(0).tolist()
    wrong = sum(int(r["fp"]) + int(r["fn"]) for r in rows)  # the Hamming-loss numerator
    assert record["test/hamming_loss"] == pytest.approx(wrong / (16 * len(CLASSES)))
    assert record["test/exact_set_accuracy"] == pytest.approx(float((pred == y).all(1).float().mean()))

    # --threshold: one value for every class, replacing the saved ones
    main(str(run["best"]), str(run["manifest"]), split="test", out_dir=str(tmp_path / "t"), num_workers=0,
         threshold=0.5)
    assert "thresholds: --threshold 0.5 for every class" in capsys.readouterr().out
    rows = _per_class(tmp_path / "t" / "reports" / "test_per_class.csv")
    pred = probs >= 0.5
    assert [float(r["threshold"]) for r in rows] == [0.5] * 3
    assert [int(r["fp"]) for r in rows] == (pred & ~y).sum(0).tolist()


def _exit_2(argv: list[str], capfd) -> str:
    from launch.evaluate import main
    from trainer.cli.errors import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(main, argv=argv)
    err = capfd.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_threshold_image_folder_and_single_label_shards_end_in_one_line(run, tmp_path, capfd):
    from helpers.data_synth import write_class_tree

    from trainer.data.listing import list_split_folders
    from trainer.data.shard_writer import write_listing

    base = ["--checkpoint", str(run["best"]), "--out_dir", str(tmp_path / "o"), "--num_workers", "0"]
    for bad in ("1.5", "0", "nan", "-0.2"):
        err = _exit_2(base + ["--data", str(run["manifest"]), f"--threshold={bad}"], capfd)
        assert "--threshold" in err and ("(0, 1)" in err or bad == "nan"), err
    folder = tmp_path / "imgs"
    write_class_tree(folder, {"red": 2, "blue": 2})
    err = _exit_2(base + ["--data", str(folder)], capfd)
    assert "image folder" in err and "no label sets" in err and "multi-label" in err, err
    write_class_tree(tmp_path / "ds" / "train", {"blue": 1, "green": 1, "red": 1})
    write_class_tree(tmp_path / "ds" / "val", {"blue": 1, "green": 1, "red": 1}, seed=4)
    write_class_tree(tmp_path / "ds" / "test", {"blue": 1, "green": 1, "red": 1}, seed=7)
    write_listing(list_split_folders(tmp_path / "ds"), tmp_path / "single", max_samples_per_shard=4)
    err = _exit_2(base + ["--data", str(tmp_path / "single")], capfd)
    assert "data.task: multiclass" in err and "multi-label model" in err, err
    assert not (tmp_path / "o" / "reports").exists()  # refused before any work


@pytest.mark.slow
def test_metrics_exact_across_ranks(run, tmp_path):
    """launch/evaluate.py on the val shards with 1 and with 2 processes (accelerate, CPU): every metric equal,
    the per-class counts exactly (one image per forward pass in both, so each sample's logits are the same)."""
    from helpers.launch_util import PY, accelerate_cmd, child_env
    from helpers.realdata import free_port

    args = ["--checkpoint", str(run["best"]), "--data", str(run["shards"]), "--split", "val", "--batch_size", "1",
            "--num_workers", "0"]
    one = subprocess.run([PY, "launch/evaluate.py", *args, "--out_dir", str(tmp_path / "one")], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(accelerate_cmd("launch/evaluate.py", *args, "--out_dir", str(tmp_path / "two"), nproc=2,
                                        port=free_port()), cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.stdout.count("val: 24 samples") == two.stdout.count("val: 24 samples") == 1  # one main process
    a, b = (json.loads((tmp_path / d / "reports" / "val_metrics.json").read_text()) for d in ("one", "two"))
    assert set(a) == set(b) and a["val/num_samples"] == b["val/num_samples"] == 24
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        else:
            assert a[key] == b[key], key
    ra, rb = (_per_class(tmp_path / d / "reports" / "val_per_class.csv") for d in ("one", "two"))
    assert [(r["tp"], r["fp"], r["fn"], r["support"], r["threshold"]) for r in ra] == \
        [(r["tp"], r["fp"], r["fn"], r["support"], r["threshold"]) for r in rb]
    for name in PNGS:
        _check_png(tmp_path / "two" / "reports" / f"val_{name}")
    assert a["val/mAP"] == pytest.approx(json.loads((run["best"] / "model.json").read_text())["metrics"]["val/mAP"],
                                         abs=1e-9)


def test_training_curves_of_a_multilabel_run_plot_map(tmp_path, monkeypatch):
    """The curves' middle panel of a multi-label run draws val mAP, micro F1 and exact-set accuracy (a single-label
    run's draws top-1): no panel says "no data yet" when the run recorded its metrics."""

    from trainer.reporting import plots

    figs = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figs.append(fig) or Path(path))
    recs = [{"step": s, "train/loss": 1.0 / s, "lr/head": 0.1} for s in (1, 2, 3)]
    recs += [{"step": s, "val/loss": 0.5, "val/mAP": m, "val/f1_micro": 0.4, "val/exact_set_accuracy": 0.2}
             for s, m in ((2, 0.6), (3, 0.7))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    plots.plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")
    middle = figs[0].axes[1]
    labels = [ln.get_label() for ln in middle.get_lines()]
    assert labels[:3] == ["val mAP", "val micro F1", "val exact-set accuracy"] and "highest mAP 0.700" in labels[3]
    assert not any(t.get_text() == "no data yet" for ax in figs[0].axes for t in ax.texts)
