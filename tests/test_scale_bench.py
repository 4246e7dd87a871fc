"""bench/scale.py's directly written shards (``run --direct``) are what the trainer's own writer makes:
a valid ``dataset.json`` whose counts match the tar members, and the training loader reads them."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

from trainer.data.loader import TrainLoader
from trainer.data.meta import read_meta
from trainer.data.stream import iter_shard
from trainer.data.transforms import build_transforms

REPO = Path(__file__).resolve().parents[1]


def _scale_module():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_direct_shards_match_their_metadata_and_load(tmp_path, capsys):
    scale = _scale_module()
    scale._direct(str(tmp_path), n=45, classes=4, per_shard=10, pool=3)
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["images"] == 45 + 2
    meta = read_meta(tmp_path / "dataset.json")
    assert meta.classes == ["c00000", "c00001", "c00002", "c00003"]
    train = meta.splits["train"]
    assert (train.num_samples, train.num_shards, train.shard_sizes) == (45, 5, [10, 10, 10, 10, 5])
    labels, keys = Counter(), set()
    for url in meta.shard_urls("train"):
        for sample in iter_shard(url):
            labels[int(sample["cls"])] += 1
            keys.add(sample["__key__"])
            assert sample["jpg"][:2] == b"\xff\xd8"
    assert len(keys) == 45 and [labels[c] for c in range(4)] == train.class_counts == [12, 11, 11, 11]
    tf = build_transforms(32, train=True, crop_pct=1.0, interpolation="bilinear", augment="standard")
    loader = TrainLoader(meta.shard_urls("train"), micro_batch_size=8, transform=tf, seed=0, rank=0, world_size=1,
                         num_workers=0, num_classes=4)
    batches = list(loader.epoch(0, 3))
    assert [tuple(b["image"].shape) for b in batches] == [(8, 3, 32, 32)] * 3
    assert all(0 <= int(y) < 4 for b in batches for y in b["label"])
