"""trainer.data.split_source.shards_for_split (issue 24): one split of a split folder, a manifest or shards -> its
shards, with the classes and where they come from; temporary shards removed; kept shards reused while unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.data_synth import write_class_tree
from trainer.config.fields import ConfigError
from trainer.data.listing import DataError
from trainer.data.split_source import shards_for_split


def _samples(found) -> int:
    """Samples in the shards (the tar members ending in ``.cls``, one per sample)."""
    import tarfile

    n = 0
    for url in found.urls:
        with tarfile.open(url) as tar:
            n += sum(m.name.endswith(".cls") for m in tar.getmembers())
    return n


def test_split_folder_gives_its_split_classes_from_train_and_a_removable_tmp(tmp_path):
    root = tmp_path / "ds"
    write_class_tree(root / "train", {"ants": 2, "bees": 2})
    write_class_tree(root / "val", {"ants": 1, "bees": 2}, seed=10)
    (root / "val" / "bees" / "broken.jpg").write_bytes(b"not an image")
    seen = []

    def refuse(classes, where, task):
        seen.append((list(classes), where, task))
        raise DataError("refused")

    tmp = tmp_path / "out" / ".shards-val"
    with pytest.raises(DataError, match="refused"):
        shards_for_split(root, "val", tmp_dir=tmp, num_workers=1, check=refuse)
    assert seen == [(["ants", "bees"], str(root / "train"), "multiclass")]
    assert not tmp.exists()  # refused before anything is written

    found = shards_for_split(root, "val", tmp_dir=tmp, num_workers=1, check=lambda *a: seen.append(a))
    assert found.classes == ["ants", "bees"] and found.classes_from == str(root / "train")
    assert found.meta.splits["val"].num_samples == 3 and found.num_skipped == 1 and _samples(found) == 3
    assert found.meta.splits["val"].class_counts == [1, 2] and set(found.meta.splits) == {"val"}
    assert found.tmp_dir == tmp and all(Path(u).is_relative_to(tmp) for u in found.urls)
    found.remove_tmp()
    assert not tmp.exists()
    with pytest.raises(DataError, match=r"--split: .* has no test/ folder"):
        shards_for_split(root, "test", tmp_dir=tmp, num_workers=1)


def test_manifest_with_and_without_split_column(tmp_path):
    paths = write_class_tree(tmp_path / "img", {"ants": 3, "bees": 2}, seed=30)
    rows = [(p.relative_to(tmp_path).as_posix(), p.parent.name) for p in paths]
    split = ["train", "test", "test", "train", "test"]
    (tmp_path / "all.csv").write_text("path,label,split\n"
                                      + "".join(f"{f},{c},{s}\n" for (f, c), s in zip(rows, split)))
    found = shards_for_split(tmp_path / "all.csv", "test", tmp_dir=tmp_path / "t1", num_workers=1)
    assert found.classes == ["ants", "bees"] and found.classes_from == str(tmp_path / "all.csv")
    assert found.meta.splits["test"].class_counts == [2, 1] and _samples(found) == 3 and found.num_skipped == 0

    (tmp_path / "Test.CSV").write_text("file,cls\n" + "".join(f"{f},{c}\n" for f, c in rows))  # every row
    found = shards_for_split(tmp_path / "Test.CSV", "val", tmp_dir=tmp_path / "t2", path_column="file",
                             label_column="cls", num_workers=1)
    assert found.meta.splits["val"].class_counts == [3, 2] and _samples(found) == 5

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"--data: .*notes.txt is not a manifest"):
        shards_for_split(tmp_path / "notes.txt", "test", tmp_dir=tmp_path / "t3")
    with pytest.raises(DataError, match="no label sets"):  # an image folder for a multi-label model
        shards_for_split(tmp_path / "img", "test", tmp_dir=tmp_path / "t3", task="multilabel")
    with pytest.raises(FileNotFoundError, match="--data: no such file or folder"):
        shards_for_split(tmp_path / "missing", "test", tmp_dir=tmp_path / "t3")
    assert not (tmp_path / "t3").exists()


def test_kept_shard_dir_is_reused_while_the_source_is_unchanged(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"ants": 2, "bees": 3})
    keep = tmp_path / "keep"
    first = shards_for_split(root, "test", shard_dir=keep, num_workers=1)
    assert first.tmp_dir is None and first.classes_from == str(root) and _samples(first) == 5
    stamp = (keep / "dataset.json").stat().st_mtime_ns
    again = shards_for_split(root, "test", shard_dir=keep, tmp_dir=tmp_path / "unused", num_workers=1)
    assert (keep / "dataset.json").stat().st_mtime_ns == stamp and again.urls == first.urls
    assert not (tmp_path / "unused").exists()

    read = shards_for_split(keep, "test")  # the kept folder itself: its dataset.json, nothing written
    assert read.urls == first.urls and read.classes_from == str(keep / "dataset.json") and read.tmp_dir is None
    with pytest.raises(DataError, match=r"--split: .* has no val samples"):
        shards_for_split(keep, "val")
    with pytest.raises(ConfigError, match="--meta: dataset metadata not found"):
        shards_for_split(str(keep / "*.tar"), "test", meta=tmp_path / "none.json")

    write_class_tree(root, {"ants": 1}, prefix="new")
    with pytest.raises(ConfigError, match="--shard_dir"):
        shards_for_split(root, "test", shard_dir=keep, num_workers=1)
    assert (keep / "dataset.json").stat().st_mtime_ns == stamp
