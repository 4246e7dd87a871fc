"""Backbone selection (trainer/selection/, launch/select_backbone.py) and the linear probe, on tiny data."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config.loading import load_config
from trainer.finetune.linear_probe import fit_linear_probe_holdout
from trainer.selection import select as select_mod
from trainer.selection.candidates import parse_candidates
from trainer.selection.report import COLUMNS, Row, pareto_front, recommend
from trainer.selection.select import SelectionOptions, select_backbones
from trainer.selection.subset import read_subset, stratified_quotas

from tests.helpers.data_synth import write_tar_shards
from tests.helpers.fake_accelerator import run_two_ranks

TINY = [("timm:test_efficientnet", "none"), ("timm:test_resnet", "none")]


# ---------------------------------------------------------------- linear probe
def test_probe_separable_and_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 8, generator=g)
    a = fit_linear_probe_holdout(x[:60], y[:60], 3)
    b = fit_linear_probe_holdout(x[:60], y[:60], 3)
    assert a.top1(x[60:], y[60:]) == 1.0
    assert torch.equal(a.weight, b.weight) and a.l2 == b.l2 and a.l2 in [r["l2"] for r in a.grid]
    # the chosen penalty has the best held-out top-1 (ties: the lower held-out loss), refitted on all rows
    noisy = x + torch.randn(90, 8, generator=g) * 6
    c = fit_linear_probe_holdout(noisy[:60], y[:60], 3, l2_grid=(1e-6, 1e-2, 1e2))
    assert len(c.grid) == 3
    assert c.l2 == max(c.grid, key=lambda r: (r["val_top1"], -r["val_loss"]))["l2"]
    assert c.val_top1 == max(r["val_top1"] for r in c.grid)
    d = fit_linear_probe_holdout(noisy[:60], y[:60], 3, l2=0.5)
    assert d.l2 == 0.5 and [r["l2"] for r in d.grid] == [0.5]
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe_holdout(x, y + 5, 3)


# ---------------------------------------------------------------- subset
def test_quotas_proportional_with_min_one():
    assert stratified_quotas([50, 30, 20], 10) == [5, 3, 2]
    assert stratified_quotas([98, 1, 1], 10) == [8, 1, 1]
    assert stratified_quotas([5, 5], 100) == [5, 5]
    assert sum(stratified_quotas([7, 13, 29, 3], 17)) == 17
    with pytest.raises(ValueError):
        stratified_quotas([5], 0)


def test_subset_same_for_any_number_of_ranks(tmp_path):
    shards, keys = write_tar_shards(tmp_path, [7, 9, 5, 11, 4], num_classes=3)
    counts = [sum(1 for i in range(len(keys)) if i % 3 == c) for c in range(3)]
    one, _ = read_subset(shards, counts, 12, seed=1, rank=0, world_size=1)
    assert [sum(s.label == c for s in one) for c in range(3)] == stratified_quotas(counts, 12)
    # two ranks (threads) exchanging (score, key, class) through a gather_object stand-in
    out, _ = run_two_ranks(lambda rank, gather: read_subset(shards, counts, 12, seed=1, rank=rank, world_size=2,
                                                            gather_object=gather)[0])
    k0, k1 = {s.key for s in out[0]}, {s.key for s in out[1]}
    assert not k0 & k1 and k0 and k1
    assert sorted(k0 | k1) == [s.key for s in one]
    other, _ = read_subset(shards, counts, 12, seed=2, rank=0, world_size=1)
    assert [s.key for s in other] != [s.key for s in one]


# ---------------------------------------------------------------- recommendation
def _row(name, top1, est, mem):
    return Row(name, "none", 224, top1, 10, 10, 1.0, 1.0, 10.0, 20.0, mem, est, False)


def test_recommendation_respects_budgets_and_pareto():
    rows = [_row("a", 0.80, 100, 500), _row("b", 0.90, 1000, 2000), _row("c", 0.95, 5000, 900),
            _row("d", 0.85, 2000, 3000)]
    assert recommend(rows).backbone == "c"
    assert recommend(rows, time_budget_s=1500).backbone == "b"
    assert recommend(rows, memory_budget_mib=1000).backbone == "c"
    assert recommend(rows, time_budget_s=1500, memory_budget_mib=1000).backbone == "a"
    assert recommend(rows, time_budget_s=50) is None
    assert [r.backbone for r in pareto_front(rows)] == ["a", "b", "c"]


def test_parse_candidates():
    assert parse_candidates("timm:tf_efficientnet_lite2,resnet18,timm:x=none") == [
        ("timm:tf_efficientnet_lite2", "package:efficientnet-lite2"), ("resnet18", "default"), ("timm:x", "none")]
    offline = parse_candidates(None)
    assert ("timm:tf_efficientnet_lite1", "package:efficientnet-lite1") in offline
    with pytest.raises(ValueError):
        parse_candidates("a,,b")


# ---------------------------------------------------------------- end to end on tiny images
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """2 classes (reddish / bluish 40x32 images), 10 + 10 train, 5 + 5 val."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 5)):
        for c, base in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(base) + rng.integers(-30, 30, (32, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg")
    return root


def _cfg(root, tmp_path):
    return load_config(None, {"data.root": str(root), "data.shard_dir": str(tmp_path / "shards"),
                              "data.samples_per_shard": 4, "train.micro_batch_size": 4,
                              "train.global_batch_size": 8, "train.epochs": 2, "model.channels_last": False})


def test_select_end_to_end_table_cache_budget(tiny_folder, tmp_path, monkeypatch, capsys):
    from trainer.distributed.accelerator import make_accelerator

    acc = make_accelerator("no")
    cfg = _cfg(tiny_folder, tmp_path)
    opts = SelectionOptions(candidates=TINY, train_subset=12, val_subset=10, steps=1,
                            cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"))
    res = select_backbones(cfg, opts, acc)
    with open(res.files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and [r["backbone"] for r in table] == [b for b, _ in TINY]
    for r in res.rows:
        assert r.probe_train_n == 12 and r.probe_val_n == 10 and 0.0 <= r.probe_top1 <= 1.0
        assert r.input_px == 160 and r.params_m > 0 and r.gflops > 0 and r.train_img_s > 0 and r.infer_img_s > 0
        assert r.est_finetune_s == pytest.approx(2 * (20 / r.train_img_s + 10 / r.infer_img_s))
        assert not r.features_cached
    assert res.files["png"].stat().st_size > 10_000
    chosen = load_config(res.files["config"])
    assert (chosen.model.backbone, chosen.model.weights) == (res.chosen.backbone, res.chosen.weights)
    assert chosen.data.root == str(tiny_folder)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2

    # second call: the features come from the cache (the shards are not even read); a budget
    # nothing meets gives no recommendation and no config
    def no_read(*a, **k):
        raise AssertionError("shards read although every candidate is cached")

    monkeypatch.setattr(select_mod, "read_subset", no_read)
    opts.time_budget_s, opts.out_dir = 1e-9, str(tmp_path / "out2")
    again = select_backbones(cfg, opts, acc)
    assert all(r.features_cached for r in again.rows)
    assert [r.probe_top1 for r in again.rows] == [r.probe_top1 for r in res.rows]
    assert again.chosen is None and "config" not in again.files
    assert not (tmp_path / "out2" / "chosen.yaml").exists()

    # data.image_size: every candidate runs at that size (features recomputed, not the 160 px cache)
    monkeypatch.undo()
    cfg.data.image_size = 64
    opts.time_budget_s, opts.out_dir = None, str(tmp_path / "out3")
    small = select_backbones(cfg, opts, acc)
    assert [r.input_px for r in small.rows] == [64, 64] and not any(r.features_cached for r in small.rows)
    assert all(r.infer_img_s > 0 for r in small.rows) and len(list((tmp_path / "cache").glob("*.pt"))) == 4


# ---------------------------------------------------------------- several processes
WORKER = """
import sys, accelerate.utils
calls = []
_orig = accelerate.utils.gather_object
def counting(obj):
    calls.append(len(obj))
    return _orig(obj)
accelerate.utils.gather_object = counting
import fire, runpy
mod = runpy.run_path(sys.argv[1], run_name="not_main")
try:
    fire.Fire(mod["main"], command=sys.argv[2:])
finally:
    print(f"GATHERS {len(calls)}", flush=True)
"""


@pytest.mark.slow
def test_select_two_processes_matches_one(tiny_folder, tmp_path):
    """2 CPU processes (accelerate launch, gloo): the same subset, features and probe top-1 as 1 process;
    features gathered once per candidate (plus one (score, class) exchange per split for the subset)."""
    import subprocess

    from tests.helpers.launch_util import ACCELERATE, PY, REPO, child_env
    from tests.helpers.realdata import free_port

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    common = [f"--data.root={tiny_folder}", f"--data.shard_dir={tmp_path / 'shards'}", "--data.samples_per_shard=3",
              "--train.micro_batch_size=4", "--train.global_batch_size=8", "--model.channels_last=false",
              "--candidates=timm:test_efficientnet=none", "--train_subset=12", "--val_subset=8", "--steps=1"]
    env = child_env(PYTHONPATH=str(REPO))
    one = subprocess.run([PY, str(script), str(REPO / "launch/select_backbone.py"), *common,
                          f"--cache_dir={tmp_path / 'c1'}", f"--out_dir={tmp_path / 'o1'}"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    two = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                          str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                          str(REPO / "launch/select_backbone.py"), *common,
                          f"--cache_dir={tmp_path / 'c2'}", f"--out_dir={tmp_path / 'o2'}"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("GATHERS 3") == 2, two.stdout[-2000:]  # 2 subset exchanges + 1 feature gather
    f1 = torch.load(next((tmp_path / "c1").glob("*.pt")), weights_only=True)
    f2 = torch.load(next((tmp_path / "c2").glob("*.pt")), weights_only=True)
    for split in ("train", "val"):
        assert f1[split]["keys"] == f2[split]["keys"] and torch.equal(f1[split]["y"], f2[split]["y"])
        torch.testing.assert_close(f1[split]["x"], f2[split]["x"], rtol=1e-4, atol=1e-5)
    with open(tmp_path / "o1/selection.csv") as a, open(tmp_path / "o2/selection.csv") as b:
        assert [r["probe_top1"] for r in csv.DictReader(a)] == [r["probe_top1"] for r in csv.DictReader(b)]
