"""Tiny synthetic images and shards for the data-layer tests (CPU, milliseconds)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    """A small RGB JPEG whose mean colour depends on ``seed``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3, dtype=np.uint8)
    arr = np.broadcast_to(base, (size[1], size[0], 3)).copy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_tar_shards(out: Path, sizes: list[int], prefix: str = "train", num_classes: int = 3) -> tuple[list[str], list[str]]:
    """Shards ``prefix-00000i.tar`` with ``sizes[i]`` samples each; keys ``s{i}-{j:04d}``.

    Returns:
        (shard paths, all keys in order).
    """
    out.mkdir(parents=True, exist_ok=True)
    paths, keys = [], []
    n = 0
    for i, size in enumerate(sizes):
        path = out / f"{prefix}-{i:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for j in range(size):
                key = f"s{i}-{j:04d}"
                w.write({"__key__": key, "jpg": jpeg_bytes(n), "cls": str(n % num_classes).encode()})
                keys.append(key)
                n += 1
        paths.append(str(path))
    return paths, keys


def write_samples(path: Path, samples: list[dict]) -> str:
    """One shard from raw sample dicts (bytes values, ``__key__``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return str(path)


def write_class_tree(root: Path, counts: dict[str, int], seed: int = 0, prefix: str = "") -> list[Path]:
    """``root/<class>/<prefix>img<i>.jpg`` with ``counts[class]`` distinct JPEGs each; returns the paths."""
    paths = []
    n = seed
    for cls, k in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(k):
            p = root / cls / f"{prefix}img{i:03d}.jpg"
            p.write_bytes(jpeg_bytes(n))
            paths.append(p)
            n += 1
    return paths


def shard_keys_and_paths(shards: list[str]) -> dict[str, bytes]:
    """``{__key__: raw bytes of <key>.path.txt}`` over the given shards (tar order)."""
    import tarfile

    out = {}
    for s in shards:
        with tarfile.open(s) as tf:
            for m in tf:
                if m.name.endswith(".path.txt"):
                    out[m.name[: -len(".path.txt")]] = tf.extractfile(m).read()
    return out


COLOURS = ("blue", "green", "red")
"""The classes of :func:`write_colour_manifest`."""


def colour_label_set(seed: int) -> list[str]:
    """The label set :func:`jpeg_bytes` ``(seed)`` shows: the colour channels above 127, sorted."""
    base = np.random.default_rng(seed).integers(0, 256, 3)
    return sorted(n for n, v in zip(("red", "green", "blue"), base) if v > 127)


def write_colour_manifest(root: Path, splits: list[str], size: tuple[int, int] = (32, 32)) -> Path:
    """A multi-label manifest ``root/all.csv`` (``path,labels,split``; labels joined with ``|``) of the uniform JPEGs
    ``root/img/<i>.jpg`` = :func:`jpeg_bytes` ``(i)``, image ``i`` in split ``splits[i]`` with the label set
    :func:`colour_label_set` ``(i)`` (an empty set: a negative). Returns the manifest's path."""
    import csv

    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = [["path", "labels", "split"]]
    for i, split in enumerate(splits):
        rel = f"img/{i:03d}.jpg"
        (root / rel).write_bytes(jpeg_bytes(i, size=size))
        rows.append([rel, "|".join(colour_label_set(i)), split])
    with open(root / "all.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "all.csv"
