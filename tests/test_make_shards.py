"""trainer/data/shard_writer.py + launch/make_shards.py: round trip, unreadable files (case 6), class maps
(case 7), parallel writers and merge, the real ants/bees folder."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.decode import decode_image_bytes
from trainer.data.loader import EvalLoader
from trainer.data.meta import read_meta
from trainer.data.shard_writer import write_shards
from trainer.data.transforms import build_transforms

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = Path("/work/shared/data/hymenoptera_data")
EVAL_TF = build_transforms(8, train=False)


def save_image(path: Path, seed: int, fmt: str = "PNG", size=(9, 7)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def read_all(out: Path, split: str, transform=lambda x: x) -> list[dict]:
    """Every sample of a split; the default identity transform keeps the decoded pixels (same sizes only)."""
    meta = read_meta(out)
    loader = EvalLoader(meta.shard_urls(split), rank=0, world_size=1, micro_batch_size=64, num_workers=0,
                        transform=transform)
    rows = []
    for b in loader:
        for img, label, key in zip(b["image"], b["label"].tolist(), b["key"]):
            rows.append({"key": key, "label": label, "image": img})
    return rows


def test_round_trip_images_and_labels(tmp_path):
    root, out = tmp_path / "images", tmp_path / "shards"
    originals = {}
    for i, (cls, name) in enumerate([("cat", "a.png"), ("cat", "b.png"), ("dog", "c.png"), ("dog", "d.v2.png"),
                                     ("dog", "sub/e.png"), ("cat", "f.bmp")]):
        fmt = "BMP" if name.endswith("bmp") else "PNG"
        save_image(root / "train" / cls / name, seed=i, fmt=fmt)
        originals[f"train/{cls}/{name}"] = np.asarray(Image.open(root / "train" / cls / name).convert("RGB"))
    save_image(root / "val" / "dog" / "v.png", seed=9)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden: not a sample
    (root / "train" / ".hidden_class").mkdir()
    meta = write_shards(root, out, max_samples_per_shard=4)
    assert meta["classes"] == ["cat", "dog"]
    tr = meta["splits"]["train"]
    assert tr["num_samples"] == 6 and tr["class_counts"] == [3, 3] and tr["num_shards"] == 2
    assert tr["shards"] == ["train-000000.tar", "train-000001.tar"] and tr["shard_sizes"] == [4, 2]
    assert meta["splits"]["val"]["class_counts"] == [0, 1]
    assert json.loads((out / "dataset.json").read_text()) == meta
    rows = read_all(out, "train")
    assert sorted(r["key"] for r in rows) == ["train/cat/a", "train/cat/b", "train/cat/f", "train/dog/c",
                                              "train/dog/d_v2", "train/dog/sub/e"]
    members = [m.name for s in tr["shards"] for m in tarfile.open(out / s)]
    paths = {}
    for s in tr["shards"]:
        with tarfile.open(out / s) as tf:
            for m in tf:
                if m.name.endswith(".path.txt"):
                    paths[m.name[: -len(".path.txt")]] = tf.extractfile(m).read().decode()
    assert "train/cat/f.png" in members  # BMP re-encoded losslessly to PNG
    for r in rows:
        rel = paths[r["key"]]
        assert r["label"] == (0 if "/cat/" in rel else 1)
        assert np.array_equal(r["image"].permute(1, 2, 0).numpy(), originals[rel])


def test_unreadable_files_named_and_never_written(tmp_path, caplog):
    root, out = tmp_path / "images", tmp_path / "shards"
    good = save_image(root / "train" / "a" / "good.jpg", 0, "JPEG", size=(40, 30))
    save_image(root / "train" / "b" / "good2.png", 1)
    (root / "train" / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    (root / "val" / "a").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="trainer.data.shard_writer"):
        meta = write_shards(root, out)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("truncated.jpg", "empty.png", "notes.txt"):
        assert str(root / "train" / ("a" if name == "truncated.jpg" else "b") / name) in warning
    assert "3 unreadable file(s)" in warning
    tr = meta["splits"]["train"]
    assert tr["num_samples"] == 2 and tr["num_skipped"] == 3
    assert any("empty" in s["reason"] for s in tr["skipped"])
    assert sorted(r["key"] for r in read_all(out, "train", EVAL_TF)) == ["train/a/good", "train/b/good2"]
    assert meta["splits"]["val"] == {**meta["splits"]["val"], "num_samples": 0, "shards": []}

    out2 = tmp_path / "strict"
    with pytest.raises(ValueError, match="truncated.jpg") as exc:
        write_shards(root, out2, strict=True)
    assert "empty.png" in str(exc.value) and "3 unreadable" in str(exc.value)
    assert not list(out2.glob("*.tar")) and not (out2 / "dataset.json").exists()


def test_class_map_from_train_used_for_val(tmp_path):
    root, out = tmp_path / "images", tmp_path / "shards"
    for i, c in enumerate("abc"):
        save_image(root / "train" / c / f"{c}0.png", i)
    save_image(root / "val" / "a" / "x.png", 10)
    save_image(root / "val" / "c" / "y.png", 11)
    (root / "val" / "b").mkdir()
    meta = write_shards(root, out)
    assert meta["classes"] == ["a", "b", "c"]
    assert meta["splits"]["val"]["class_counts"] == [1, 0, 1]
    assert {r["key"]: r["label"] for r in read_all(out, "val")} == {"val/a/x": 0, "val/c/y": 2}
    assert read_meta(out).num_classes == 3

    save_image(root / "val" / "d" / "z.png", 12)
    with pytest.raises(ValueError, match=r"class folder .*val/d.* not a class of the training split"):
        write_shards(root, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_existing_shards_need_overwrite(tmp_path):
    root, out = tmp_path / "images", tmp_path / "shards"
    save_image(root / "train" / "a" / "x.png", 0)
    write_shards(root, out, splits="train")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(root, out, splits="train")
    assert write_shards(root, out, splits="train", overwrite=True)["splits"]["train"]["num_samples"] == 1


@pytest.mark.slow  # writer processes
@pytest.mark.timeout(120)
def test_parallel_writers_pool_and_worker_index_merge(tmp_path):
    root = tmp_path / "images"
    for i in range(11):
        save_image(root / "train" / ("a" if i % 2 else "b") / f"{i}.png", i)
    for i in range(3):
        save_image(root / "val" / "a" / f"v{i}.png", 100 + i)
    single = write_shards(root, tmp_path / "single", max_samples_per_shard=2)
    pool = write_shards(root, tmp_path / "pool", max_samples_per_shard=2, num_workers=3)
    assert pool["splits"]["train"]["shards"] == single["splits"]["train"]["shards"]  # names independent of N
    for split in ("train", "val"):
        for k in ("num_samples", "class_counts"):
            assert pool["splits"][split][k] == single["splits"][split][k]
    assert sorted(r["key"] for r in read_all(tmp_path / "pool", "train")) == \
        sorted(r["key"] for r in read_all(tmp_path / "single", "train"))

    nodes = tmp_path / "nodes"  # one writer per process, as on several nodes
    for k in range(2):
        subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "--root", str(root), "--out",
                        str(nodes), "--num_workers", "2", "--worker_index", str(k), "--max_samples_per_shard", "2"],
                       check=True, timeout=90, capture_output=True)
    merged = read_meta(nodes)  # the last writer merged the partial files
    assert merged.splits["train"].num_samples == 11 and merged.splits["val"].class_counts == [3, 0]
    assert (nodes / "dataset.w00-of-02.json").is_file()


@pytest.mark.slow  # real images
@pytest.mark.timeout(120)
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="ants/bees folder not present")
def test_real_ants_bees_folder(tmp_path):
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "--root", str(HYMENOPTERA),
                           "--out", str(out), "--max_samples_per_shard", "100"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "train: 245 samples, 3 shards, 0 skipped" in proc.stdout
    meta = read_meta(out)
    assert meta.classes == ["ants", "bees"]
    assert meta.splits["train"].class_counts == [124, 121] and meta.splits["val"].class_counts == [70, 83]
    # the placeholder GIF (train/ants/imageNotFound.gif) is a valid image: stored as GIF, decoded to RGB
    gif = None
    for shard in meta.shard_urls("train"):
        with tarfile.open(shard) as tf:
            if "train/ants/imageNotFound.gif" in tf.getnames():
                gif = tf.extractfile("train/ants/imageNotFound.gif").read()
    assert gif is not None and gif[:6] == b"GIF89a"
    img = decode_image_bytes(gif)
    assert img.shape == (3, 300, 300) and img.dtype == torch.uint8
    loader = EvalLoader(meta.shard_urls("val"), rank=0, world_size=1, micro_batch_size=64, num_workers=0,
                        transform=EVAL_TF)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 153 and loader.last_skipped == []
