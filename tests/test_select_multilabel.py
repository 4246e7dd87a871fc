"""Backbone selection on multi-label data (issue 26): the subset keeps every class, features carry (N, C) multi-hot
targets, the sigmoid probe ranks candidates by val mAP, the table / CSV say mAP, the cache key includes the task,
the recommended config keeps data.task: multilabel."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from tests.helpers.data_synth import jpeg_bytes, shard_keys_and_paths, write_samples
from tests.helpers.fake_accelerator import run_two_ranks
from trainer.config.loading import load_config
from trainer.data.multilabel import dumps_labels
from trainer.models.classifier import Preprocessing
from trainer.reporting.multilabel import mean_average_precision
from trainer.selection import select as select_mod
from trainer.selection.features import SplitFeatures, cache_path, load_cached, save_cached
from trainer.selection.multilabel import fit_probe_multilabel, probe_map, read_subset_multilabel
from trainer.selection.report import COLUMNS, Row, columns, format_table, ranking, recommend
from trainer.selection.select import SelectionOptions, select_backbones, summary
from trainer.selection.subset import stratified_quotas

TINY = [("timm:test_efficientnet", "none"), ("timm:test_resnet", "none")]


# ------------------------------------------------------------------------------------------ subset
def _label_sets(n: int) -> list[tuple[int, ...]]:
    """Class 0 common, 1 medium, 2 on one sample only, some negatives (empty sets)."""
    sets = []
    for i in range(n):
        s = {0} if i % 2 == 0 else set()
        if i % 3 == 0:
            s.add(1)
        if i == n - 7:
            s.add(2)
        sets.append(tuple(sorted(s)))
    return sets


def _shards(tmp_path, sets: list[tuple[int, ...]], per_shard: int = 9) -> list[str]:
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg_bytes(i), "labels.json": dumps_labels(s)}
               for i, s in enumerate(sets)]
    samples.append({"__key__": "bad", "jpg": jpeg_bytes(999), "cls": b"1"})  # a single-label sample: skipped
    return [write_samples(tmp_path / f"train-{j:06d}.tar", samples[j:j + per_shard])
            for j in range(0, len(samples), per_shard)]


def _expected_subset(sets, counts, size, seed) -> list[str]:
    """The documented rule, written out: per class its q_c lowest sha256(seed/key) carriers, then the lowest others."""
    keys = [f"k{i:03d}" for i in range(len(sets))]
    score = {k: hashlib.sha256(f"{seed}/{k}".encode()).hexdigest() for k in keys}
    order = sorted(keys, key=lambda k: score[k])
    chosen = set()
    for c, q in enumerate(stratified_quotas(counts, size)):
        chosen |= set([k for k in order if c in sets[keys.index(k)]][:q])
    for k in order:
        if len(chosen) >= size:
            break
        chosen.add(k)
    return sorted(chosen)


def test_subset_keeps_every_class_follows_the_rule_and_is_rank_independent(tmp_path):
    sets = _label_sets(60)
    counts = [sum(c in s for s in sets) for c in range(3)]
    assert counts[2] == 1
    shards = _shards(tmp_path, sets)
    by_key = {f"k{i:03d}": s for i, s in enumerate(sets)}
    for seed in range(5):  # a plain draw of 6 of 60 would miss the one class-2 sample for most seeds
        got, skipped = read_subset_multilabel(shards, counts, 6, seed=seed, rank=0, world_size=1)
        keys = [s.key for s in got]
        assert keys == _expected_subset(sets, counts, 6, seed) and len(keys) == 6
        assert all(s.label == by_key[s.key] for s in got)
        assert all(any(c in s.label for s in got) for c in range(3))
        assert len(skipped) == 1 and "bad: no 'labels.json' label set" in skipped[0]
    whole, _ = read_subset_multilabel(shards, counts, 1000, seed=0, rank=0, world_size=1)
    assert [s.key for s in whole] == sorted(by_key)
    # two ranks (threads) exchanging their candidates through a gather_object stand-in: one exchange each
    one, _ = read_subset_multilabel(shards, counts, 10, seed=3, rank=0, world_size=1)
    out, calls = run_two_ranks(lambda rank, gather: read_subset_multilabel(
        shards, counts, 10, seed=3, rank=rank, world_size=2, gather_object=gather)[0])
    k0, k1 = {s.key for s in out[0]}, {s.key for s in out[1]}
    assert sorted(calls) == [0, 1] and not k0 & k1 and k0 and k1
    assert sorted(k0 | k1) == [s.key for s in one]
    with pytest.raises(ValueError, match="gather_object"):
        read_subset_multilabel(shards, counts, 10, seed=3, rank=0, world_size=2)


# ------------------------------------------------------------------------------------------ probe, cache, report
def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 3, generator=g) < 0.4).float()
    x = torch.cat([y * 4 + torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g)], 1)
    return x, y


def test_probe_chooses_l2_by_held_out_map_and_refits_on_all_rows():
    x, y = _separable(120, 0)
    keys = [f"k{i:03d}" for i in range(120)]
    a = fit_probe_multilabel(x, y, keys, seed=1, l2_grid=(1e-4, 1e-1, 10.0))
    b = fit_probe_multilabel(x, y, keys, seed=1, l2_grid=(1e-4, 1e-1, 10.0))
    assert torch.equal(a.weight, b.weight) and a.l2 == b.l2
    assert len(a.grid) == 3 and a.l2 == max(a.grid, key=lambda r: (r["val_map"], -r["val_loss"]))["l2"]
    assert a.val_map == max(r["val_map"] for r in a.grid)
    xt, yt = _separable(200, 5)
    assert probe_map(a, xt, yt) > 0.95
    assert probe_map(a, xt, yt) == mean_average_precision(a.logits(xt), yt)
    with pytest.raises(ValueError, match="keys"):
        fit_probe_multilabel(x, y, keys[:-1])


def test_cache_key_includes_the_task_and_a_file_of_the_other_task_is_not_used(tmp_path):
    prep = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 0.9)
    args = (tmp_path, "timm:test_resnet", "none", prep, "no", "f" * 64, {"train": 4, "val": 2, "seed": 0})
    single, multi = cache_path(*args), cache_path(*args, "multilabel")
    assert single == cache_path(*args, "multiclass") and "multilabel" not in single.name
    assert multi != single and "__multilabel__" in multi.name
    x = torch.randn(4, 3)
    one = {s: SplitFeatures(x, torch.tensor([0, 1, 0, 1]), list("abcd")) for s in ("train", "val")}
    sets = {s: SplitFeatures(x, torch.tensor([[1., 0.], [0., 1.], [1., 1.], [0., 0.]]), list("abcd"))
            for s in ("train", "val")}
    save_cached(multi, one)  # single-label features where the multi-label ones would go: never loaded
    assert load_cached(multi, "multilabel") is None
    save_cached(multi, sets, "multilabel")
    got = load_cached(multi, "multilabel")
    assert torch.equal(got["train"].y, sets["train"].y) and got["val"].keys == list("abcd")
    assert load_cached(multi) is None  # a single-label run never takes multi-label features
    save_cached(single, one)
    assert torch.equal(load_cached(single)["train"].y, one["train"].y)


def _row(name, top1, mAP, est):
    return Row(name, "none", 64, top1, 10, 10, 1.0, 1.0, 10.0, 20.0, 100.0, est, False, 0.1, mAP)


def test_report_ranks_and_names_the_metric(tmp_path):
    from trainer.selection.report import write_csv

    rows = [_row("a", float("nan"), 0.7, 10), _row("b", float("nan"), 0.9, 50), _row("c", float("nan"), 0.8, 5)]
    assert [r.backbone for r in ranking(rows, "probe_map")] == ["b", "c", "a"]
    assert recommend(rows, metric="probe_map").backbone == "b"
    assert recommend(rows, metric="probe_map", time_budget_s=20).backbone == "c"
    assert recommend(rows) is None  # top-1 is NaN on multi-label rows
    assert "probe_map" not in COLUMNS and columns("probe_map") == [
        "probe_map" if c == "probe_top1" else c for c in COLUMNS]
    with open(write_csv(rows, tmp_path / "m.csv", "probe_map")) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == columns("probe_map") and [float(r["probe_map"]) for r in table] == [0.7, 0.9, 0.8]
    with open(write_csv(rows, tmp_path / "s.csv")) as f:
        assert list(next(csv.DictReader(f))) == COLUMNS
    assert format_table(rows, "probe_map").split()[2] == "probe_map"
    assert format_table(rows).split()[2] == "probe_top1"
    with pytest.raises(ValueError, match="metric"):
        columns("top5")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """52 uniform-colour JPEGs: label set = the colour channels above 127, plus a class 'rare' on two training
    images and one val image; 40 train, 12 val."""
    root = tmp_path_factory.mktemp("mldata")
    (root / "img").mkdir()
    rows, sets = [["path", "labels", "split"]], {}
    for i in range(52):
        rel = f"img/{i:03d}.jpg"
        (root / rel).write_bytes(jpeg_bytes(i, size=(32, 32)))
        base = np.random.default_rng(i).integers(0, 256, 3)  # the image's colour (helpers.data_synth)
        labels = [n for n, v in zip(("red", "green", "blue"), base) if v > 127] + (["rare"] if i in (5, 17, 44) else [])
        sets[rel] = set(labels)
        rows.append([rel, "|".join(labels), "train" if i < 40 else "val"])
    with open(root / "all.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "all.csv", sets


def test_select_multilabel_ranks_by_map_end_to_end(manifest, tmp_path, monkeypatch):
    from trainer.distributed.accelerator import make_accelerator

    path, sets = manifest
    cfg = load_config(None, {"data.manifest": str(path), "data.task": "multilabel",
                             "data.shard_dir": str(tmp_path / "s"), "data.samples_per_shard": 8, "data.image_size": 64, "train.micro_batch_size": 4,
                             "train.global_batch_size": 8, "train.epochs": 2, "model.channels_last": False})
    opts = SelectionOptions(candidates=TINY, train_subset=16, val_subset=12, steps=1,
                            cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"))
    res = select_backbones(cfg, opts, make_accelerator("no"))
    assert res.metric == "probe_map"
    classes = json.loads((tmp_path / "s" / "dataset.json").read_text())["classes"]
    paths = shard_keys_and_paths([str(p) for p in (tmp_path / "s").rglob("*.tar")])
    maps = {}
    for (backbone, _), row in zip(TINY, res.rows):
        assert row.backbone == backbone and row.probe_train_n == 16 and row.probe_val_n == 12
        assert 0.0 <= row.probe_map <= 1.0 and np.isnan(row.probe_top1) and not row.features_cached
        files = list((tmp_path / "cache").glob(backbone.replace(":", "-") + "__*__multilabel__*.pt"))
        assert len(files) == 1
        feats = load_cached(files[0], "multilabel")
        tr, va = feats["train"], feats["val"]
        assert tr.y.shape == (16, len(classes)) and va.y.shape == (12, len(classes))
        for split in (tr, va):  # the multi-hot rows are the label sets of the manifest
            for key, y in zip(split.keys, split.y):
                assert {classes[c] for c in torch.nonzero(y).flatten().tolist()} == sets[paths[key].decode()]
        assert bool((tr.y.sum(0) > 0).all()), "a class has no positive in the training subset"
        probe = fit_probe_multilabel(tr.x, tr.y, tr.keys, seed=opts.seed)  # the probe's own val mAP
        maps[backbone] = mean_average_precision(probe.logits(va.x), va.y)
        assert row.probe_map == pytest.approx(maps[backbone], abs=1e-12) and row.probe_l2 == probe.l2
    expected = sorted(res.rows, key=lambda r: (-maps[r.backbone], r.est_finetune_s))
    assert [r.backbone for r in ranking(res.rows, "probe_map")] == [r.backbone for r in expected]
    assert res.chosen.backbone == expected[0].backbone
    with open(res.files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == columns("probe_map") and "probe_top1" not in table[0]
    assert [float(r["probe_map"]) for r in table] == pytest.approx([r.probe_map for r in res.rows])
    text = summary(res, opts)
    assert "probe_map" in text.splitlines()[0] and "probe_top1" not in text
    assert f"{res.chosen.backbone} (weights none): probe val mAP {res.chosen.probe_map:.3f}" in text
    assert res.files["png"].stat().st_size > 10_000
    chosen = load_config(res.files["config"])
    assert chosen.data.task == "multilabel" and chosen.data.manifest == str(path)
    assert chosen.data.label_delimiter == cfg.data.label_delimiter and chosen.train.early_stopping.monitor == "val/mAP"
    assert chosen.model.backbone == res.chosen.backbone

    def no_read(*a, **k):
        raise AssertionError("shards read although every candidate is cached")

    monkeypatch.setattr(select_mod, "read_subset_multilabel", no_read)
    opts.out_dir = str(tmp_path / "out2")
    again = select_backbones(cfg, opts, make_accelerator("no"))
    assert all(r.features_cached for r in again.rows)
    assert [r.probe_map for r in again.rows] == [r.probe_map for r in res.rows]
