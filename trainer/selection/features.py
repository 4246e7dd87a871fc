"""Frozen-backbone features of the selected subset: computed once per rank, gathered once, cached on disk.

Each rank decodes its own selected samples (:func:`trainer.selection.subset.read_subset`) with the
trainer's evaluation transform at the run's input size (``data.image_size``, else the backbone's own),
crop and interpolation (:func:`trainer.data.transforms.build_transforms`), normalises with the backbone's mean / std and runs
the backbone in eval mode (no gradients, the run's precision). The ``(key, label, feature)`` rows of
all ranks are exchanged in ONE ``gather_object`` per backbone (train and val together) and sorted by
key, so the result does not depend on the number of ranks.

Multi-label shards (``multilabel=True``): the labels are the ``(C,)`` float32 multi-hot vectors of the samples'
``labels.json`` label sets (:func:`trainer.data.stream.decode_sample`), so ``y`` is ``(N, C)``.

Cache: ``<cache_dir>/<backbone>__<weights>__<digest>.pt`` where the digest covers the backbone,
weights, preprocessing, precision, the data fingerprint (:func:`trainer.selection.subset.data_fingerprint`),
subset sizes and seed, and for multi-label data the task (the name then ends ``__multilabel__<digest>.pt`` and
the file records ``"task": "multilabel"``; a file of the other task is never loaded). Written by the main
process only (temp file + rename: a crash leaves no partial file); read with
:func:`trainer.models.state_dict.safe_torch_load` (``weights_only=True``). A hit skips reading the shards entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data.stream import SampleError, decode_sample
from trainer.data.transforms import build_transforms
from trainer.models.classifier import ImageClassifier, Preprocessing
from trainer.models.state_dict import safe_torch_load
from trainer.selection.subset import SubsetSample
from trainer.files.atomic import atomic_write

log = logging.getLogger("trainer")

CACHE_FORMAT = 1


@dataclass
class SplitFeatures:
    """Features of one split's subset: ``x`` (N, F) float32, ``y`` (N,) int64 (multi-label: (N, C) float32
    multi-hot), ``keys`` (sorted)."""

    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]


def cache_path(cache_dir: str | Path, backbone: str, weights: str, prep: Preprocessing, precision: str,
               fingerprint: str, subset: dict, task: str = "multiclass") -> Path:
    """Cache file for these features (see the module docstring); the name starts readable.

    ``task`` (``data.task``) enters the digest and the name unless it is ``multiclass`` (so single-label
    cache names stay those of earlier versions)."""
    key = {"format": CACHE_FORMAT, "backbone": backbone, "weights": weights, "prep": prep.to_dict(),
           "precision": precision, "data": fingerprint, "subset": subset}
    if task != "multiclass":
        key["task"] = task
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{backbone}__{Path(weights).name if weights.endswith('.pth') else weights}"
                  + ("" if task == "multiclass" else f"__{task}"))
    return Path(cache_dir) / f"{slug}__{digest}.pt"


def load_cached(path: Path, task: str = "multiclass") -> dict[str, SplitFeatures] | None:
    """The cached splits, or None if there is no (readable) cache file of this ``task`` (a file recording
    another task, or whose labels have the other shape, is recomputed)."""
    if not path.is_file():
        return None
    try:
        obj = safe_torch_load(path)
        got = obj.get("task", "multiclass")
        if got != task:
            raise ValueError(f"features of data.task {got}, this run has {task}")
        out = {s: SplitFeatures(obj[s]["x"], obj[s]["y"], list(obj[s]["keys"])) for s in ("train", "val")}
        if any(f.y.ndim != (2 if task == "multilabel" else 1) for f in out.values()):
            raise ValueError(f"labels of shape {tuple(out['train'].y.shape)} do not fit data.task {task}")
        return out
    except Exception as e:  # a foreign or damaged file: recompute and overwrite it
        log.warning("feature cache %s unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None


def save_cached(path: Path, splits: dict[str, SplitFeatures], task: str = "multiclass") -> None:
    """Write atomically (:func:`trainer.files.atomic.atomic_write`); a ``task`` other than ``multiclass`` is
    recorded in the file."""
    obj = {s: {"x": f.x, "y": f.y, "keys": f.keys} for s, f in splits.items()}
    if task != "multiclass":
        obj["task"] = task
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _batches(samples: list[SubsetSample], transform, batch_size: int, num_classes: int, skipped: list[str],
             multilabel: bool = False):
    images, labels, keys = [], [], []
    for s in samples:
        try:
            image, label = decode_sample(s.raw, transform, num_classes, multilabel)
        except SampleError as e:
            skipped.append(f"{s.url}:{s.key}: {e}")
            continue
        images.append(image)
        labels.append(label)
        keys.append(s.key)
        if len(images) == batch_size:
            yield torch.stack(images), labels, keys
            images, labels, keys = [], [], []
    if images:
        yield torch.stack(images), labels, keys


@torch.no_grad()
def compute_features(model: ImageClassifier, prep: Preprocessing, samples: dict[str, list[SubsetSample]], *,
                     num_classes: int, batch_size: int, device: torch.device, autocast, gather_object=None,
                     multilabel: bool = False) -> tuple[dict[str, SplitFeatures], list[str]]:
    """Features of this rank's ``samples`` per split, then of all ranks (one ``gather_object``).

    Args:
        model: the classifier (``normalize`` + ``forward_features``), on ``device``, eval mode.
        prep: its preprocessing (input size, crop_pct, interpolation, mean, std).
        samples: split name -> this rank's selected samples.
        num_classes, batch_size: labels outside ``[0, num_classes)`` are skipped; images per forward.
        autocast: a context-manager factory (``accelerator.autocast``).
        gather_object: ``accelerate.utils.gather_object`` for several ranks (None: single process).
        multilabel: the samples carry ``labels.json`` label sets: ``y`` becomes ``(N, num_classes)`` multi-hot.

    Returns:
        ``(splits, skipped)``: all ranks' features per split (rows sorted by key) and the undecodable
        samples of all ranks (``"shard:key: reason"``).
    """
    transform = build_transforms(prep.input_size, train=False, crop_pct=prep.crop_pct,
                                 interpolation=prep.interpolation)
    rows, skipped = [], []
    for split, mine in samples.items():
        for images, labels, keys in _batches(mine, transform, batch_size, num_classes, skipped, multilabel):
            x = model.normalize(images.to(device))  # the model's mean / std and memory format
            with autocast():
                f = model.forward_features(x)
            f = f.float().cpu()
            rows += [(split, k, lab, f[i].clone()) for i, (k, lab) in enumerate(zip(keys, labels))]
    if gather_object is not None:
        everything = gather_object([(rows, skipped)])
        rows = [r for part, _ in everything for r in part]
        skipped = [s for _, part in everything for s in part]
    out = {}
    for split in samples:
        mine = sorted((r for r in rows if r[0] == split), key=lambda r: r[1])
        if not mine:
            raise ValueError(f"split {split!r}: no decodable sample in the subset ({len(skipped)} skipped)")
        y = torch.stack([r[2] for r in mine]) if multilabel else torch.tensor([r[2] for r in mine], dtype=torch.int64)
        out[split] = SplitFeatures(torch.stack([r[3] for r in mine]), y, [r[1] for r in mine])
    return out, skipped
