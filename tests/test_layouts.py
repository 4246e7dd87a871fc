"""Dataset layouts (issue 12): class folders + stratified split, manifests, leaks, test split, reuse and
refusal of changed sources, data sanity (issue 15 item 5), file names that are bytes (issue 15 item 2)."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.data_synth import jpeg_bytes, shard_keys_and_paths, write_class_tree
from trainer.config.schema import ConfigError, DataConfig
from trainer.data.listing import DataError, list_class_folders, list_split_folders, printable
from trainer.data.manifest import list_manifest
from trainer.data.meta import read_meta
from trainer.data.prepare import prepare_dataset, tree_sha256
from trainer.data.shard_writer import write_listing

ONE = SimpleNamespace(num_processes=1, is_main_process=True, process_index=0)


def _prepare(tmp_path, **kw):
    kw.setdefault("shard_dir", str(tmp_path / "shards"))
    kw.setdefault("shard_workers", 1)
    return prepare_dataset(DataConfig(samples_per_shard=4, **kw), ONE)


# ---- class folders + stratified split -------------------------------------------------------------------


def test_stratified_split_is_deterministic_and_recorded(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 20, "b": 10, "c": 5})
    one = list_class_folders(root, val_fraction=0.2, test_fraction=0.2, seed=3)
    two = list_class_folders(root, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert {s: [i.rel for i in v] for s, v in one.splits.items()} == {s: [i.rel for i in v] for s, v in two.splits.items()}
    counts = {s: [sum(1 for i in v if i.label == c) for c in range(3)] for s, v in one.splits.items()}
    assert counts == {"train": [12, 6, 3], "val": [4, 2, 1], "test": [4, 2, 1]}  # per class: floor(f * n + 0.5)
    other = list_class_folders(root, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert [i.rel for i in other.splits["val"]] != [i.rel for i in one.splits["val"]]  # the seed matters
    all_rel = sorted(i.rel for v in one.splits.values() for i in v)
    assert len(all_rel) == len(set(all_rel)) == 35  # a partition

    prep = _prepare(tmp_path, root=str(root), val_fraction=0.2, test_fraction=0.2, split_seed=3)
    meta = prep.meta
    assert meta.source["layout"] == "class_folders" and meta.source["params"]["split_seed"] == 3
    assert meta.source["split"]["sha256"] == one.source["split"]["sha256"]
    assert (prep.num_train_samples, prep.num_val_samples, prep.num_test_samples) == (21, 7, 7)
    val_keys = set(shard_keys_and_paths(prep.val_shards))
    assert val_keys == {"val/" + i.rel.rsplit(".", 1)[0] for i in one.splits["val"]}


def test_restart_reuses_and_changes_are_refused(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 6, "b": 6})
    first = _prepare(tmp_path, root=str(root), val_fraction=0.25)
    shard = Path(first.train_shards[0])
    mtime = shard.stat().st_mtime_ns
    again = _prepare(tmp_path, root=str(root), val_fraction=0.25)  # a restart: same shards, nothing rewritten
    assert again.train_shards == first.train_shards and shard.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: 0\.3 differs from the 0\.25"):
        _prepare(tmp_path, root=str(root), val_fraction=0.3)
    with pytest.raises(ConfigError, match=r"^data\.split_seed: 1 differs"):
        _prepare(tmp_path, root=str(root), val_fraction=0.25, split_seed=1)
    (root / "b" / "new.jpg").write_bytes(jpeg_bytes(99))
    with pytest.raises(ConfigError, match=r"source changed .*12 -> 13 files"):
        _prepare(tmp_path, root=str(root), val_fraction=0.25)
    (root / "b" / "new.jpg").unlink()
    copy = tmp_path / "copy"  # the same names elsewhere (new mtimes): a new shard_dir gets the same split
    write_class_tree(copy, {"a": 6, "b": 6})
    moved = prepare_dataset(DataConfig(root=str(copy), val_fraction=0.25, shard_dir=str(tmp_path / "s2"),
                                       samples_per_shard=4, shard_workers=1), ONE)
    assert moved.meta.source["split"]["sha256"] == first.meta.source["split"]["sha256"]
    assert moved.meta.source["files_sha256"] != first.meta.source["files_sha256"]


def test_config_rules_name_the_field(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 3})
    for kw, field in [({"val_fraction": 1.5}, "data.val_fraction"), ({"val_fraction": 0.6, "test_fraction": 0.4},
                                                                       "data.val_fraction"),
                      ({"test_fraction": 0.2}, "data.test_fraction"), ({}, "data.val_fraction"),
                      ({"manifest": "x.csv"}, "data.manifest"), ({"val_fraction": 0.2, "shard_workers": 0},
                                                                  "data.shard_workers")]:
        with pytest.raises(ConfigError, match=rf"^{field}"):
            _prepare(tmp_path, root=str(root), **kw)
    split = tmp_path / "split"
    write_class_tree(split / "train", {"a": 2})
    write_class_tree(split / "val", {"a": 1}, seed=100)
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: .* already has train/"):
        _prepare(tmp_path, root=str(split), val_fraction=0.2)


@pytest.mark.parametrize("val_name", ["val", "validation", "valid"])
def test_split_folders_named_validation_or_valid_are_val(tmp_path, val_name):
    root = tmp_path / "split"
    write_class_tree(root / "train", {"a": 2, "b": 2})
    write_class_tree(root / val_name, {"a": 1, "b": 1}, seed=100)
    write_class_tree(root / "test", {"a": 1}, seed=200)
    listing = list_split_folders(root)
    assert sorted(listing.splits) == ["test", "train", "val"] and len(listing.splits["val"]) == 2
    assert {it.rel.split("/")[0] for it in listing.splits["val"]} == {val_name}  # rel: the real path
    prep = _prepare(tmp_path, root=str(root))
    assert (prep.num_train_samples, prep.num_val_samples, prep.num_test_samples) == (4, 2, 1)
    for name in ("val", "validation", "valid"):  # make_shards --splits train,validation: the val split too
        assert list_split_folders(root, splits=["train", name]).splits["val"] == listing.splits["val"]
    before = tree_sha256(root)  # a download's tree checksum covers the validation folder, whatever its name
    (root / val_name / "a" / "img000.jpg").write_bytes(jpeg_bytes(7))
    assert tree_sha256(root) != before
    other = "valid" if val_name == "validation" else "validation"
    write_class_tree(root / other, {"a": 1}, seed=300)
    names = sorted([val_name, other], key=("val", "validation", "valid").index)
    with pytest.raises(DataError, match=rf"^data\.root: .* has two validation folders, {names[0]}/ and {names[1]}/"):
        list_split_folders(root)


def test_split_folders_without_val_name_the_accepted_names(tmp_path):
    root = tmp_path / "split"
    write_class_tree(root / "train", {"a": 2})
    with pytest.raises(DataError, match=r"has train/ but no val/ \(or validation/, valid/\) folder"):
        list_split_folders(root)


# ---- data sanity -------------------------------------------------------------------------------------------


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 3, "b": 3})
    (root / "empty").mkdir()
    (root / "empty" / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(ConfigError, match=r"^data\.root: training class folder .*/imgs/empty holds no image"):
        _prepare(tmp_path, root=str(root), val_fraction=0.3)
    split = tmp_path / "split"
    write_class_tree(split / "train", {"a": 2, "b": 2})
    write_class_tree(split / "val", {"a": 1}, seed=100)
    (split / "val" / "b").mkdir()  # an empty *validation* class folder is fine (count 0)
    (split / "train" / "c").mkdir()
    with pytest.raises(ConfigError, match=r"training class folder .*/split/train/c holds no image"):
        _prepare(tmp_path, root=str(split))
    (split / "train" / "c").rmdir()
    assert _prepare(tmp_path, root=str(split)).meta.splits["val"].class_counts == [1, 0]


def test_missing_root_is_an_error_whatever_else_is_configured(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root / "train", {"a": 2})
    write_class_tree(root / "val", {"a": 1}, seed=100)
    _prepare(tmp_path, root=str(root))  # shards now exist in shard_dir
    for extra in ({}, {"download_url": "http://127.0.0.1:9/never.zip"}):
        with pytest.raises(ConfigError, match=r"^data\.root: folder not found: .*/typo"):
            _prepare(tmp_path, root=str(tmp_path / "typo"), **extra)
    assert not (tmp_path / "data").exists()  # nothing downloaded
    assert _prepare(tmp_path).num_train_samples == 2  # no data.root: the user points at the existing shards


# ---- manifests ------------------------------------------------------------------------------------------------


def _eurosat_like(tmp_path) -> Path:
    """EuroSAT's layout: class folders + train/validation/test CSVs (unnamed index, Filename, Label,
    ClassName) + label_map.json; classes in the label map's order, which is not alphabetical here."""
    root = tmp_path / "euro"
    names = ["Zebra", "Apple", "Mango"]
    write_class_tree(root, {n: 6 for n in names})
    (root / "label_map.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    files = {"train": [], "validation": [], "test": []}
    for i, n in enumerate(names):
        for j in range(6):
            split = "train" if j < 4 else ("validation" if j == 4 else "test")
            files[split].append([str(len(files[split]) * 7), f"{n}/img{j:03d}.jpg", str(i), n])
    for split, rows in files.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["", "Filename", "Label", "ClassName"], *rows])
    return root


def _euro_cfg(root, **kw):
    return dict(manifest={"train": str(root / "train.csv"), "val": str(root / "validation.csv"),
                          "test": str(root / "test.csv")}, path_column="Filename", label_column="ClassName",
                label_map=str(root / "label_map.json"), **kw)


def test_manifest_per_split_files_with_label_map(tmp_path):
    root = _eurosat_like(tmp_path)
    prep = _prepare(tmp_path, **_euro_cfg(root))
    assert prep.meta.classes == ["Zebra", "Apple", "Mango"]
    assert (prep.num_train_samples, prep.num_val_samples, prep.num_test_samples) == (12, 3, 3)
    paths = shard_keys_and_paths(prep.train_shards)
    assert paths["train/Apple/img000"] == b"Apple/img000.jpg"
    # integer labels through the label map give the same shards; columns by index too
    by_index = _euro_cfg(root, shard_dir=str(tmp_path / "s2"))
    by_index.update(path_column=1, label_column=2)
    assert _prepare(tmp_path, **by_index).meta.splits["test"].class_counts == [1, 1, 1]


def test_manifest_single_file_with_split_column_and_jsonl(tmp_path):
    root = tmp_path / "m"
    write_class_tree(root / "img", {"cat": 3, "dog": 3})
    rows = [{"file": f"img/{c}/img{i:03d}.jpg", "class": c, "split": "train" if i < 2 else "valid"}
            for c in ("cat", "dog") for i in range(3)]
    (root / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = _prepare(tmp_path, manifest=str(root / "all.jsonl"))
    assert prep.meta.classes == ["cat", "dog"] and prep.num_val_samples == 2 and prep.test_shards is None
    rows[0]["split"] = "holdout"
    (root / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"^data\.split_column: .*all\.jsonl line 1: split 'holdout'"):
        _prepare(tmp_path, manifest=str(root / "all.jsonl"), shard_dir=str(tmp_path / "s2"))


def test_manifest_missing_file_reported_by_line_and_path(tmp_path, caplog):
    root = _eurosat_like(tmp_path)
    (root / "Apple" / "img001.jpg").unlink()
    (root / "Mango" / "img002.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING):
        prep = _prepare(tmp_path, **_euro_cfg(root))
    skipped = {s["where"]: s for s in json.loads((tmp_path / "shards" / "dataset.json").read_text())
               ["splits"]["train"]["skipped"]}
    assert skipped["train.csv line 7"]["reason"] == "file not found"
    assert skipped["train.csv line 7"]["path"].endswith("Apple/img001.jpg")
    assert "not a readable image" in skipped["train.csv line 12"]["reason"]
    text = caplog.text
    assert "Apple/img001.jpg (train.csv line 7): file not found" in text and "train.csv line 12" in text
    assert prep.num_train_samples == 10


def test_manifest_unknown_label_names_the_row(tmp_path):
    root = _eurosat_like(tmp_path)
    lines = (root / "validation.csv").read_text().splitlines()
    lines[2] = lines[2].replace("Apple", "Banana")
    (root / "validation.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"validation\.csv line 3: label 'Banana' is not in the class map"):
        list_manifest(**_euro_cfg(root))
    with pytest.raises(ConfigError, match=r"^data\.label_column: validation\.csv line 3"):
        _prepare(tmp_path, **_euro_cfg(root))


def test_leaks_duplicate_bytes_and_repeated_paths(tmp_path, caplog):
    root = _eurosat_like(tmp_path)
    (root / "Mango" / "img005.jpg").write_bytes((root / "Mango" / "img000.jpg").read_bytes())  # test = train
    with pytest.raises(ConfigError, match=r"^data\.on_leak: 1 image\(s\) with the same bytes in two splits "
                                          r"\(e\.g\. train:train\.csv line 10 = test:test\.csv line 4\)"):
        _prepare(tmp_path, **_euro_cfg(root))
    with caplog.at_level(logging.WARNING):  # warn: the same shards are used, the leak is logged
        assert _prepare(tmp_path, **_euro_cfg(root, on_leak="warn")).num_test_samples == 3
    assert "1 image(s) with the same bytes in two splits" in caplog.text
    with open(root / "validation.csv", "a", newline="") as f:
        csv.writer(f).writerow(["99", "Zebra/img000.jpg", "0", "Zebra"])  # a training path, listed again
    with pytest.raises(ConfigError, match=r"1 path\(s\) listed more than once \(e\.g\. .*Zebra/img000\.jpg in "
                                          r"train\.csv line 2 \(train\), validation\.csv line 5 \(val\)"):
        _prepare(tmp_path, **_euro_cfg(root, shard_dir=str(tmp_path / "s2")))


# ---- file names that are not text -------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes as names")
def test_bytes_file_names_round_trip(tmp_path, caplog):
    root = tmp_path / "imgs"
    write_class_tree(root / "train", {"a": 1, "b": 1})
    write_class_tree(root / "val", {"a": 1, "b": 1}, seed=100)
    names = [b"caf\xe9-latin1.jpg", b"two\nlines.jpg", b"x" * 250 + b".jpg", "ünïcode.jpg".encode()]
    for i, n in enumerate(names):
        with open(os.path.join(os.fsencode(root / "train" / "a"), n), "wb") as f:
            f.write(jpeg_bytes(50 + i))
    with open(os.path.join(os.fsencode(root / "train" / "b"), b"bad\xff\nname.jpg"), "wb") as f:
        f.write(b"garbage")
    with caplog.at_level(logging.WARNING):
        prep = _prepare(tmp_path, root=str(root))
    paths = shard_keys_and_paths(prep.train_shards)
    stored = set(paths.values())
    for n in names:
        assert b"train/a/" + n in stored  # the exact bytes of every name
    assert all(k.isprintable() and len(k) <= 180 for k in paths)
    assert "train/a/caf\\xe9-latin1" in paths and "train/a/two\\nlines" in paths
    skipped = read_meta(tmp_path / "shards")
    assert prep.num_train_samples == 6 and skipped.splits["train"].num_skipped == 1
    assert "bad\\xff\\nname.jpg" in caplog.text  # reported by its (printable) name, on one line
    raw = json.loads((tmp_path / "shards" / "dataset.json").read_text())["splits"]["train"]["skipped"][0]["path"]
    assert os.fsencode(raw).endswith(b"bad\xff\nname.jpg")  # and recoverable byte for byte
    assert printable(os.fsdecode(b"a\xffb\n")) == "a\\xffb\\n"


# ---- atomic writing ---------------------------------------------------------------------------------------------


def test_leftovers_of_an_interrupted_write_are_cleaned(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root / "train", {"a": 3})
    write_class_tree(root / "val", {"a": 1}, seed=100)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"half a shard")  # what an older version left after a kill
    dead = tmp_path / f".shards.staging-{__import__('socket').gethostname()}-999999999"
    dead.mkdir()
    prep = _prepare(tmp_path, root=str(root))
    assert prep.num_train_samples == 3 and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")) == []
    (out / "dataset.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^data\.shard_dir: .* holds no dataset\.json but other files"):
        _prepare(tmp_path, root=str(root))
    assert (out / "notes.txt").read_text() == "mine"


def test_listing_written_with_a_pool_equals_one_process(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 9, "b": 7})
    listing = list_class_folders(root, val_fraction=0.3)
    one = write_listing(listing, tmp_path / "one", max_samples_per_shard=3)
    two = write_listing(listing, tmp_path / "two", max_samples_per_shard=3, num_workers=2)
    assert one["splits"] == two["splits"]
    assert shard_keys_and_paths(read_meta(tmp_path / "one").shard_urls("train")) == \
        shard_keys_and_paths(read_meta(tmp_path / "two").shard_urls("train"))


# ---- two ranks ---------------------------------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, root: str, shard_dir: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc = SimpleNamespace(num_processes=world, is_main_process=rank == 0, process_index=rank)
        prep = prepare_dataset(DataConfig(root=root, val_fraction=0.3, test_fraction=0.2, split_seed=7,
                                          shard_dir=shard_dir, samples_per_shard=4, shard_workers=1), acc)
        mine = list_class_folders(root, val_fraction=0.3, test_fraction=0.2, seed=7)  # computed on this rank
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "recorded": prep.meta.source["split"]["sha256"], "own": mine.source["split"]["sha256"],
            "val_keys": sorted(shard_keys_and_paths(prep.val_shards))}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_split_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers.realdata import free_port

    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 11, "b": 9, "c": 6})
    mp.spawn(_rank, args=(2, free_port(), str(root), str(tmp_path / "shards"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["recorded"] == r0["own"] and len(r0["val_keys"]) == 8
