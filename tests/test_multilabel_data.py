"""Multi-label data (issue 26, items 1 and 7): the three manifest forms -> label sets, bad input as one line naming
the row or field, shards holding label sets that stream back as (B, C) float32 multi-hot targets, the task recorded
in dataset.json, the iterative stratified split; single-label manifests unchanged."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import trainer.main as entry
from tests.helpers.data_synth import jpeg_bytes, write_samples
from trainer.config.schema import ConfigError, DataConfig
from trainer.data.listing import DataError
from trainer.data.loader import EvalLoader, TrainLoader
from trainer.data.manifest import list_manifest
from trainer.data.meta import read_meta
from trainer.data.multilabel import iterative_split
from trainer.data.prepare import prepare_dataset
from trainer.data.shard_writer import assign_keys, write_listing
from trainer.data.transforms import build_transforms

REPO = Path(__file__).resolve().parents[1]
ONE = SimpleNamespace(num_processes=1, is_main_process=True, process_index=0)
EVAL_TF = build_transforms(8, train=False)
TRAIN_TF = build_transforms(8, train=True)
CLASSES = ["forest", "river", "road"]
# (label cell, split) per image; the label sets below are what every form must give
CELLS = [("river|forest", "train"), ("forest", "train"), ("", "train"), ("road|river", "train"),
         (" road | forest | road ", "train"), ("river", "train"), ("forest|road", "val"), ("", "val")]
SETS = [{"forest", "river"}, {"forest"}, set(), {"river", "road"}, {"forest", "road"}, {"river"}, {"forest", "road"},
        set()]


def _images(root: Path, n: int, seed: int = 0) -> list[str]:
    """``root/img/<i>.jpg``, ``n`` distinct small JPEGs; returns their paths relative to ``root``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        rel = f"img/{i:03d}.jpg"
        (root / rel).write_bytes(jpeg_bytes(seed + i))
        rels.append(rel)
    return rels


def _csv(path: Path, rows: list[list]) -> str:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(path)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _delimited(root: Path, cells=CELLS, name: str = "all.csv") -> str:
    rels = _images(root, len(cells))
    return _csv(root / name, [["path", "labels", "split"]] + [[r, c, s] for r, (c, s) in zip(rels, cells)])


def _named_sets(listing) -> list[tuple[str, set[str]]]:
    return [(it.rel, {listing.classes[y] for y in it.labels}) for s in ("train", "val") for it in listing.splits[s]]


def _expected() -> list[tuple[str, set[str]]]:
    return [(f"img/{i:03d}.jpg", s) for i, s in enumerate(SETS)]


def _read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------------------------------ the three forms


def _form_csv_delimited(root):
    return _delimited(root), {}


def _form_jsonl_lists(root):
    rels = _images(root, len(CELLS))
    rows = [{"path": r, "labels": sorted(s) if i != 4 else [" road ", "forest", "road"], "split": sp}
            for i, (r, s, (_, sp)) in enumerate(zip(rels, SETS, CELLS))]
    rows[0]["labels"] = "river|forest"  # a string in JSONL is split like a CSV cell
    rows[2]["labels"] = None  # null: a negative too
    return _jsonl(root / "all.jsonl", rows), {}


def _form_columns(spec):
    def make(root):
        rels = _images(root, len(CELLS))
        rows = [["split", "path", "road", "forest", "river"]]
        for r, s, (_, sp) in zip(rels, SETS, CELLS):
            rows.append([sp, r] + [("1.0" if c == "road" else "1") if c in s else "0"
                                   for c in ("road", "forest", "river")])
        return _csv(root / "all.csv", rows), {"label_columns": spec}
    return make


def _form_jsonl_columns(root):
    rels = _images(root, len(CELLS))
    rows = [{"path": r, "split": sp, **{c: (True if c == "forest" else 1) if c in s else 0 for c in CLASSES}}
            for r, s, (_, sp) in zip(rels, SETS, CELLS)]
    return _jsonl(root / "all.jsonl", rows), {"label_columns": "rest"}


@pytest.mark.parametrize("form", [_form_csv_delimited, _form_jsonl_lists, _form_columns("rest"),
                                  _form_columns(["road", "river", "forest"]), _form_columns([2, 3, 4]),
                                  _form_jsonl_columns],
                         ids=["csv-delimited", "jsonl-lists", "columns-rest", "columns-names", "columns-indices",
                              "jsonl-columns"])
def test_each_manifest_form_gives_the_label_sets(tmp_path, form):
    manifest, kw = form(tmp_path)
    listing = list_manifest(manifest, task="multilabel", **kw)
    assert listing.task == "multilabel" and listing.classes == CLASSES
    assert _named_sets(listing) == _expected()
    for it in listing.splits["train"] + listing.splits["val"]:
        assert it.label == -1 and list(it.labels) == sorted(set(it.labels))
    assert listing.class_counts("train") == [3, 3, 2]  # training images carrying each class
    assert listing.source["params"]["task"] == "multilabel"


def test_custom_delimiter_and_label_map(tmp_path):
    cells = [(c.replace("|", ";"), s) for c, s in CELLS]
    manifest = _delimited(tmp_path, cells)
    (tmp_path / "map.json").write_text(json.dumps(["road", "river", "forest", "lake"]))
    with pytest.raises(DataError, match=r"^data\.label_map: class 'lake' has no training row"):
        list_manifest(manifest, task="multilabel", label_delimiter=";", label_map=str(tmp_path / "map.json"))
    (tmp_path / "map.json").write_text(json.dumps(["road", "river", "forest"]))
    listing = list_manifest(manifest, task="multilabel", label_delimiter=";", label_map=str(tmp_path / "map.json"))
    assert listing.classes == ["road", "river", "forest"]  # the map's order
    assert _named_sets(listing) == _expected()


def test_single_label_manifest_under_multilabel_is_one_label_sets(tmp_path):
    rels = _images(tmp_path, 4)
    manifest = _csv(tmp_path / "all.csv", [["path", "label", "split"], [rels[0], "cat", "train"],
                                           [rels[1], "dog", "train"], [rels[2], "dog", "val"], [rels[3], "cat", "val"]])
    listing = list_manifest(manifest, task="multilabel")
    assert [it.labels for it in listing.splits["train"] + listing.splits["val"]] == [(0,), (1,), (1,), (0,)]


def test_single_label_manifests_are_unchanged(tmp_path):
    rels = _images(tmp_path, 4)
    manifest = _csv(tmp_path / "all.csv", [["path", "label", "split"], [rels[0], "cat", "train"],
                                           [rels[1], "dog", "train"], [rels[2], "dog", "val"], [rels[3], "cat", "val"]])
    listing = list_manifest(manifest)
    assert listing.task == "multiclass" and listing.classes == ["cat", "dog"]
    assert [(it.label, it.labels) for it in listing.splits["train"] + listing.splits["val"]] == \
        [(0, ()), (1, ()), (1, ()), (0, ())]
    assert sorted(listing.source["params"]) == ["label_column", "label_map", "path_column", "split_column"]
    meta = write_listing(listing, tmp_path / "shards", max_samples_per_shard=10)
    assert meta["task"] == "multiclass" and meta["splits"]["train"]["class_counts"] == [1, 1]
    with tarfile.open(tmp_path / "shards" / meta["splits"]["train"]["shards"][0]) as tar:
        names = tar.getnames()
    assert any(n.endswith(".cls") for n in names) and not any(n.endswith(".labels.json") for n in names)
    batch = next(iter(EvalLoader(read_meta(tmp_path / "shards").shard_urls("val"), rank=0, world_size=1,
                                 micro_batch_size=4, num_workers=0, transform=EVAL_TF, num_classes=2)))
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [1, 0]


# ------------------------------------------------------------------------------------------ bad input


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("cell,line,pattern", [
    ("forest|lake", 8, r"^data\.label_column: all\.csv line 8: label 'lake' is not in the class map \(3 classes"),
    ("forest||road", 8, r"^data\.manifest: all\.csv line 8: label 'forest\|\|road' has an empty label between two"),
    ("forest|", 8, r"^data\.manifest: all\.csv line 8: label 'forest\|' has an empty label between"),
])
def test_bad_label_cells_name_file_and_row(tmp_path, cell, line, pattern):
    cells = list(CELLS)
    cells[line - 2] = (cell, cells[line - 2][1])
    manifest = _delimited(tmp_path, cells)
    with pytest.raises(DataError, match=pattern) as info:
        list_manifest(manifest, task="multilabel")
    assert str(tmp_path / "all.csv") in _one_line(info)
    with pytest.raises(ConfigError, match=pattern):  # the run's path: exit 2 in the CLI
        prepare_dataset(DataConfig(manifest=manifest, task="multilabel", shard_dir=str(tmp_path / "s"),
                                   shard_workers=1), ONE)


def test_label_missing_from_the_label_map_in_train(tmp_path):
    manifest = _delimited(tmp_path)
    (tmp_path / "map.json").write_text(json.dumps(["forest", "road"]))
    with pytest.raises(DataError, match=r"^data\.label_column: all\.csv line 2: label 'river' is not in the class map "
                                        r"\(2 classes from data\.label_map .*all\.csv line 5: label 'river'") as info:
        list_manifest(manifest, task="multilabel", label_map=str(tmp_path / "map.json"))
    _one_line(info)


@pytest.mark.parametrize("value", ["2", "", "yes", "0.5"])
def test_a_01_column_holding_anything_else_names_column_and_row(tmp_path, value):
    manifest, _ = _form_columns("rest")(tmp_path)
    rows = _read_csv(manifest)
    rows[4][3] = value  # line 5, column 'forest'
    _csv(Path(manifest), rows)
    with pytest.raises(DataError, match=rf"^data\.label_columns: all\.csv line 5: column 'forest' holds '{value}' "
                                        r"\(want 0 or 1\)") as info:
        list_manifest(manifest, task="multilabel", label_columns="rest")
    _one_line(info)
    with pytest.raises(DataError, match=r"^data\.label_columns: column 'lake' not in .*all\.csv"):
        list_manifest(manifest, task="multilabel", label_columns=["forest", "lake"])


def test_multilabel_manifest_under_multiclass_says_set_the_task(tmp_path):
    manifest = _delimited(tmp_path, [(c or "forest", s) for c, s in CELLS], name="a.csv")  # no empty label
    rows = _read_csv(manifest)
    rows[0][1] = "label"
    _csv(Path(manifest), rows)
    with pytest.raises(DataError, match=r"^data\.task: a\.csv line 2: label 'river\|forest' holds several labels .*"
                                        r"set data\.task: multilabel.*a\.csv line 5: label 'road\|river'") as info:
        list_manifest(manifest)
    _one_line(info)
    rels = _images(tmp_path / "j", 3)
    jsonl = _jsonl(tmp_path / "j" / "all.jsonl", [{"path": rels[0], "label": ["a", "b"], "split": "train"},
                                                  {"path": rels[1], "label": "a", "split": "train"},
                                                  {"path": rels[2], "label": [], "split": "val"}])
    with pytest.raises(DataError, match=r"^data\.task: all\.jsonl line 1: label \['a', 'b'\] holds several labels.*"
                                        r"all\.jsonl line 3: label \[\]"):
        list_manifest(jsonl)
    with pytest.raises(DataError, match=r"^data\.label_column: .*'labels' looks multi-label: set data\.task: "
                                        r"multilabel"):
        list_manifest(_delimited(tmp_path / "b"))  # a 'labels' column and no 'label' column


@pytest.mark.parametrize("kw,pattern", [
    ({"task": "multiclass", "label_columns": ["a", "b"]}, r"^data\.label_columns: .*needs data\.task: multilabel"),
    ({"task": "multilabel", "root": "x"}, r"^data\.task: multilabel needs data\.manifest"),
    ({"task": "multilabel", "manifest": "m.csv", "label_delimiter": ""}, r"^data\.label_delimiter:"),
    ({"task": "multilabel", "manifest": "m.csv", "label_columns": "rest", "label_column": "y"},
     r"^data\.label_columns: set either"),
    ({"task": "multilabel", "manifest": "m.csv", "label_columns": ["a", "a"]}, r"^data\.label_columns: .*distinct"),
    ({"task": "multilabel", "manifest": "m.csv", "label_columns": "others"}, r"^data\.label_columns:"),
    ({"task": "multi", "manifest": "m.csv"}, r"^data\.task: 'multi' is not allowed"),
    ({"manifest": "m.csv", "val_fraction": 0.2}, r"^data\.val_fraction: a manifest gives its own splits"),
])
def test_config_fields_are_checked_once(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DataConfig(**kw)


def test_defaults():
    d = DataConfig()
    assert (d.task, d.label_delimiter, d.label_columns) == ("multiclass", "|", None)
    assert DataConfig(manifest="m.csv", task="multilabel", label_columns=[2, "b"]).label_columns == [2, "b"]


def _fails_with_one_line(capfd, tmp_path, run: str, **overrides) -> str:
    """``trainer/main.py``'s ``main`` in-process on the ants/bees config + ``overrides``: exit 2 and one line."""
    ov = {"data.root": None, "data.shard_dir": str(tmp_path / "shards"), "data.num_workers": 0,
          "train.output_dir": str(tmp_path / run), "logging.wandb": "disabled", "logging.progress": False}
    ov.update(overrides)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        entry.main(config=str(REPO / "configs/ants_bees_lite0.yaml"), **ov)
    err = capfd.readouterr().err
    assert e.value.code == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(("config error:", "error:"))]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_cli_exits_2_with_one_line(tmp_path, capfd):
    manifest = _delimited(tmp_path)
    line = _fails_with_one_line(capfd, tmp_path, "r1", **{"data.manifest": manifest, "data.label_columns": "rest"})
    assert line.startswith("config error: data.label_columns:")
    line = _fails_with_one_line(capfd, tmp_path, "r2", **{"data.manifest": manifest})
    assert line.startswith("config error: data.label_column:") and "set data.task: multilabel" in line
    cells = list(CELLS)
    cells[6] = ("forest|lake", "val")
    manifest = _delimited(tmp_path / "b", cells)
    line = _fails_with_one_line(capfd, tmp_path, "r3", **{"data.manifest": manifest, "data.task": "multilabel"})
    assert line.startswith("config error: data.label_column: all.csv line 8: label 'lake' is not in the class map")


# ------------------------------------------------------------------------------------------ shards and batches


def _multi_hot(listing, split: str) -> dict[str, list[float]]:
    items = listing.splits[split]
    out = {}
    for it, key in zip(items, assign_keys(items, split, listing.key_prefix)):
        out[key] = [1.0 if c in it.labels else 0.0 for c in range(len(listing.classes))]
    return out


def test_shards_stream_back_multi_hot_targets(tmp_path):
    cells = CELLS[:6] * 3 + CELLS[6:]  # 18 training rows (3 shards of 6), 2 val rows
    cells = [(c, "train") for c, _ in cells[:18]] + cells[18:]
    listing = list_manifest(_delimited(tmp_path, cells), task="multilabel")
    meta = write_listing(listing, tmp_path / "shards", max_samples_per_shard=6)
    assert meta["task"] == "multilabel"
    read = read_meta(tmp_path / "shards")
    assert read.task == "multilabel" and read.splits["train"].class_counts == listing.class_counts("train") == [9, 9, 6]
    with tarfile.open(tmp_path / "shards" / meta["splits"]["train"]["shards"][0]) as tar:
        names = tar.getnames()
        member = next(n for n in names if n.endswith(".labels.json"))
        assert json.loads(tar.extractfile(member).read()) in ([0, 1], [0], [], [1, 2], [0, 2], [1])
    assert not any(n.endswith(".cls") for n in names)
    for split, make in (("val", lambda urls: EvalLoader(urls, rank=0, world_size=1, micro_batch_size=4,
                                                         num_workers=0, transform=EVAL_TF, num_classes=3,
                                                         task="multilabel")),
                        ("train", lambda urls: EvalLoader(urls, rank=0, world_size=1, micro_batch_size=4,
                                                           num_workers=0, transform=EVAL_TF, num_classes=3,
                                                           task="multilabel"))):
        want = _multi_hot(listing, split)
        got = {}
        for batch in make(read.shard_urls(split)):
            assert batch["label"].dtype == torch.float32 and batch["label"].shape == (len(batch["key"]), 3)
            assert batch["image"].shape[1:] == (3, 8, 8) and batch["image"].dtype == torch.uint8
            got.update(zip(batch["key"], batch["label"].tolist()))
        assert got == want
    loader = TrainLoader(read.shard_urls("train"), rank=0, world_size=1, micro_batch_size=5, num_workers=0,
                         transform=TRAIN_TF, seed=0, shuffle_buffer=4, num_classes=3, task="multilabel")
    want = _multi_hot(listing, "train")
    batches = list(loader.epoch(0, 3))
    for batch in batches:
        assert batch["label"].dtype == torch.float32 and batch["label"].shape == (5, 3)
        assert all(want[k] == row for k, row in zip(batch["key"], batch["label"].tolist()))
    # the same shards read as single-label: every sample is a bad sample that says what to set
    ev = EvalLoader(read.shard_urls("val"), rank=0, world_size=1, micro_batch_size=4, num_workers=0,
                    transform=EVAL_TF, num_classes=3)
    assert list(ev) == [] and all("set data.task: multilabel" in s for s in ev.last_skipped)
    assert len(ev.last_skipped) == 2
    with pytest.raises(ValueError, match=r"task='multilabel' needs num_classes"):
        EvalLoader(read.shard_urls("val"), rank=0, world_size=1, micro_batch_size=4, num_workers=0,
                   transform=EVAL_TF, task="multilabel")


def test_shards_of_another_task_are_refused(tmp_path):
    rels = _images(tmp_path, 4)
    manifest = _csv(tmp_path / "all.csv", [["path", "label", "split"], [rels[0], "cat", "train"],
                                           [rels[1], "dog", "train"], [rels[2], "dog", "val"], [rels[3], "cat", "val"]])
    ml = DataConfig(manifest=manifest, task="multilabel", shard_dir=str(tmp_path / "ml"), shard_workers=1)
    prep = prepare_dataset(ml, ONE)
    assert prep.meta.task == "multilabel" and prep.num_train_samples == 2
    assert prepare_dataset(ml, ONE).meta.task == "multilabel"  # the same source and task: reused
    with pytest.raises(ConfigError, match=r"^data\.task: the shards in .*ml were written for data\.task: multilabel, "
                                          r"this run has multiclass"):
        prepare_dataset(DataConfig(manifest=manifest, shard_dir=str(tmp_path / "ml"), shard_workers=1), ONE)
    mc = DataConfig(manifest=manifest, shard_dir=str(tmp_path / "mc"), shard_workers=1)
    assert prepare_dataset(mc, ONE).meta.task == "multiclass"
    with pytest.raises(ConfigError, match=r"^data\.task: the shards in .*mc were written for data\.task: multiclass, "
                                          r"this run has multilabel"):
        prepare_dataset(DataConfig(manifest=manifest, task="multilabel", shard_dir=str(tmp_path / "mc"),
                                   shard_workers=1), ONE)
    with pytest.raises(ConfigError, match=r"^data\.task: 'multilabel', but the shards of .*dataset\.json were written "
                                          r"for data\.task: multiclass"):
        prepare_dataset(DataConfig(task="multilabel", train_shards=str(tmp_path / "mc" / "train-000000.tar"),
                                   meta=str(tmp_path / "mc" / "dataset.json")), ONE)


# ------------------------------------------------------------------------------------------ the automatic split


def _pool(n: int = 60) -> list[tuple[str, ...]]:
    """Label sets with frequent (a, b), medium (c), rare (d: 3 rows, e: 1 row) labels and negatives."""
    sets = []
    for i in range(n):
        s = {"a"} if i % 2 == 0 else set()
        if i % 3 == 0:
            s.add("b")
        if i % 5 == 0:
            s.add("c")
        if i in (7, 21, 44):
            s.add("d")
        if i == 13:
            s.add("e")
        sets.append(tuple(sorted(s)))
    return sets


def test_iterative_split_is_stratified_deterministic_and_keeps_every_label_in_train():
    sets = _pool()
    names = [f"img/{i:03d}.jpg" for i in range(len(sets))]
    fr = {"train": 0.6, "val": 0.2, "test": 0.2}
    parts = iterative_split(sets, names, fr, seed=0)
    assert parts == iterative_split(sets, names, fr, seed=0)
    assert parts != iterative_split(sets, names, fr, seed=1)
    # the input order does not matter, only the names
    order = list(reversed(range(len(sets))))
    assert [parts[i] for i in order] == iterative_split([sets[i] for i in order], [names[i] for i in order], fr, 0)
    for label in "abcde":
        rows = [p for p, s in zip(parts, sets) if label in s]
        assert "train" in rows, label
        if len(rows) >= 10:  # frequent labels: each split within one row of its share of them
            for split, f in fr.items():
                assert abs(rows.count(split) - f * len(rows)) <= 1.0 + 1e-9, (label, split, rows.count(split))
    for split, f in fr.items():
        assert abs(parts.count(split) - f * len(sets)) <= 2, (split, parts.count(split))


def test_manifest_without_val_is_split_by_val_fraction(tmp_path):
    sets = _pool(40)
    rels = _images(tmp_path, len(sets))
    manifest = _csv(tmp_path / "all.csv", [["path", "labels"]] + [[r, "|".join(s)] for r, s in zip(rels, sets)])
    one = list_manifest(manifest, task="multilabel", val_fraction=0.25, split_seed=3)
    two = list_manifest(manifest, task="multilabel", val_fraction=0.25, split_seed=3)
    assert _named_sets(one) == _named_sets(two) and one.source["split"] == two.source["split"]
    assert one.classes == ["a", "b", "c", "d", "e"] and 0 not in one.class_counts("train")
    assert 0 not in one.class_counts("val")[:3]  # the frequent labels are in val too
    assert abs(len(one.splits["val"]) - 10) <= 1 and len(one.splits["train"]) + len(one.splits["val"]) == 40
    assert sorted(it.rel for s in ("train", "val") for it in one.splits[s]) == rels
    params = one.source["params"]
    assert (params["val_fraction"], params["test_fraction"], params["split_seed"]) == (0.25, 0.0, 3)
    cfg = {"manifest": manifest, "task": "multilabel", "shard_dir": str(tmp_path / "s"), "shard_workers": 1,
           "val_fraction": 0.25}
    prep = prepare_dataset(DataConfig(**cfg), ONE)
    assert prep.num_val_samples == len(one.splits["val"]) and prep.test_shards is None
    with pytest.raises(ConfigError, match=r"^data\.split_seed: 1 differs from the 0"):
        prepare_dataset(DataConfig(**{**cfg, "split_seed": 1}), ONE)
    three = list_manifest(manifest, task="multilabel", val_fraction=0.2, test_fraction=0.2)
    assert {len(three.splits[s]) for s in ("val", "test")} <= {7, 8, 9} and 0 not in three.class_counts("train")
    with pytest.raises(DataError, match=r"^data\.val_fraction: the manifest has 2 val row\(s\) \(e\.g\. all\.csv "
                                        r"line 8"):
        list_manifest(_delimited(tmp_path / "v"), task="multilabel", val_fraction=0.2)


def test_bad_label_sets_in_shards_are_bad_samples(tmp_path):
    shard = write_samples(tmp_path / "val-000000.tar", [
        {"__key__": "ok", "jpg": jpeg_bytes(1), "labels.json": b"[2, 0]"},
        {"__key__": "neg", "jpg": jpeg_bytes(2), "labels.json": b"[]"},
        {"__key__": "range", "jpg": jpeg_bytes(3), "labels.json": b"[3]"},
        {"__key__": "text", "jpg": jpeg_bytes(4), "labels.json": b"river"},
        {"__key__": "single", "jpg": jpeg_bytes(5), "cls": b"1"}])
    ev = EvalLoader([shard], rank=0, world_size=1, micro_batch_size=8, num_workers=0, transform=EVAL_TF,
                    num_classes=3, task="multilabel")
    (batch,) = list(ev)
    assert batch["key"] == ["ok", "neg"] and batch["label"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    skipped = sorted(s.split(f"{shard}:", 1)[1] for s in ev.last_skipped)
    assert len(skipped) == 3, skipped
    assert skipped[0] == "range: label 3 outside [0, 3)"
    assert skipped[1].startswith("single: no 'labels.json' label set (a single-label sample")
    assert skipped[2].startswith("text: 'labels.json' is not JSON")


def test_the_planner_survey_counts_images_per_label(tmp_path):
    from trainer.data.survey import survey_data

    survey = survey_data(DataConfig(manifest=_delimited(tmp_path), task="multilabel", shard_dir=str(tmp_path / "s")))
    assert survey.classes == tuple(CLASSES) and survey.class_counts == (3, 3, 2)


@pytest.mark.slow
def test_parallel_and_independent_writers_write_the_same_label_sets(tmp_path):
    cells = [(c, "train") for c, _ in CELLS[:6] * 3] + CELLS[6:]
    listing = list_manifest(_delimited(tmp_path, cells), task="multilabel")
    one = write_listing(listing, tmp_path / "one", max_samples_per_shard=4)
    pool = write_listing(listing, tmp_path / "pool", max_samples_per_shard=4, num_workers=2)
    for k in range(3):
        indep = write_listing(listing, tmp_path / "indep", max_samples_per_shard=4, num_workers=3, worker_index=k)
    for meta in (pool, indep):
        assert meta["task"] == "multilabel" and meta["splits"] == one["splits"]

    def label_members(folder):
        out = {}
        for name in one["splits"]["train"]["shards"]:
            with tarfile.open(folder / name) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".labels.json")})
        return out
    assert label_members(tmp_path / "one") == label_members(tmp_path / "pool") == label_members(tmp_path / "indep")
    assert len(label_members(tmp_path / "one")) == 18
