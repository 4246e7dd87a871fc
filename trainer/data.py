"""WebDataset input pipeline: shard resolution, per-rank/per-worker splitting, shuffle, decode, batching.

Why not ``accelerator.prepare(dataloader)``: for an ``IterableDataset`` Accelerate either dispatches
every batch from rank 0 or lets each rank read the full stream (every sample read world_size times).
Why not ``WebDataset(...).with_epoch(n)``: ``n`` counts per DataLoader worker, so the epoch length is
multiplied by the worker count, and ranks whose shards hold fewer samples run out first and hang
the others in the next all-reduce. Instead the loaders here split the work explicitly:

**Training** (:class:`TrainLoader`): R = world_size x max(num_workers, 1) readers. Every epoch the
shard list is shuffled with ``(seed, epoch)`` (same order on every rank), rank r takes
``order[r::world_size]`` and its worker w takes every num_workers-th of those. Each worker reads its
shards, passes raw samples through a shuffle buffer (``shuffle_buffer`` samples, seeded per
``(seed, epoch, rank, worker)``, drained at the end of each pass so a pass over the worker's shards
yields each of their samples once), decodes + augments, and forms ``micro_batch_size`` batches itself.
When it runs out of shards it starts over on the same shards (reshuffled): the stream never ends,
and :meth:`TrainLoader.epoch` takes exactly ``num_batches`` batches from it on every rank, whatever
the shard sizes, so every rank runs the same number of optimizer steps. The caller computes
``num_batches`` from ``dataset.json`` counts: ``steps_per_epoch(num_samples, global_batch_size) *
grad_accum_steps``. With ``resampled=True`` each worker instead draws shards with replacement from
the full list (seeded per reader): use it when there are fewer shards than readers.
Augmentation randomness comes from torch's RNG seeded per ``(seed, epoch, rank, worker)`` and swapped
in only around the transform, so an epoch is reproducible and the caller's global RNG is untouched
(also with ``num_workers=0``).

**Evaluation** (:class:`EvalLoader`): finite, each sample exactly once over all ranks, no padding, no
drop_last. With at least R shards, reader i reads shards ``i, i+R, ...``; with fewer, the R readers
are spread over the shards (reader i reads shard ``i % n``) and the k readers of a shard keep every
k-th sample of it. Ranks may get different batch counts; the caller all-reduces sums.

**Bad samples**: a sample without a ``cls`` label, without an image, or whose image does not decode
(truncated JPEG, random bytes) is dropped; ``"shard_url:key: reason"`` goes into the ``skipped`` list
of the next batch of that worker (for the main loop to count and log). A shard that cannot be read
(missing, truncated tar) reports ``"shard_url:<shard>: reason"``. ``bad_samples="strict"`` raises
:class:`BadSampleError` with the same text instead. A worker that gets no decodable sample from a
full pass over its shards raises instead of spinning forever.

Batches (dicts): ``image`` (B, 3, S, S) uint8, ``label`` (B,) int64, ``key`` list[str] (``__key__``
of each sample), ``skipped`` list[str].
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from trainer.transforms import ImageDecodeError, decode_image_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "image", "img")
"""Sample fields looked up, in this order, for the encoded image."""

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


# ----------------------------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class SplitMeta:
    """One split of ``dataset.json``: sample count, shard names (relative to the metadata folder)."""

    num_samples: int
    num_shards: int
    class_counts: list[int]
    shards: list[str]
    shard_sizes: list[int] | None = None
    num_skipped: int = 0


@dataclass(frozen=True)
class DatasetMeta:
    """Contents of ``dataset.json`` (written by :func:`trainer.shards.write_shards`).

    Attributes:
        classes: class names in label order (index = integer label), from the training split.
        splits: split name -> :class:`SplitMeta`.
        format_version: 1.
        root: folder of ``dataset.json``; relative shard names are relative to it.
    """

    classes: list[str]
    splits: dict[str, SplitMeta]
    format_version: int
    root: str = "."
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_urls(self, split: str) -> list[str]:
        """Paths/URLs of the shards of ``split`` (relative names joined to :attr:`root`).

        Raises:
            KeyError: no such split (message names the split and the available ones).
        """
        if split not in self.splits:
            raise KeyError(f"dataset.json in {self.root}: no split '{split}' (have {sorted(self.splits)})")
        return [s if (_URL_RE.match(s) or s.startswith("pipe:") or os.path.isabs(s)) else os.path.join(self.root, s)
                for s in self.splits[split].shards]


def _need(obj: dict, key: str, typ: type | tuple, where: str, path: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: missing key '{where}{key}'")
    value = obj[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ValueError(f"{path}: key '{where}{key}' must be {getattr(typ, '__name__', typ)}, "
                         f"got {type(value).__name__}")
    return value


def read_meta(path: str | os.PathLike) -> DatasetMeta:
    """Read and check ``dataset.json`` (a file, or a folder holding it).

    Returns:
        :class:`DatasetMeta` with ``root`` = the file's folder.

    Raises:
        FileNotFoundError: no such file. ValueError: invalid JSON or a missing/ill-typed/inconsistent
            key; the message names the file and the key (e.g. ``splits.val.class_counts``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.json"
    if not p.is_file():
        raise FileNotFoundError(f"read_meta: dataset metadata not found: {p}")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{p}: not valid JSON: {exn}") from None
    path_s = str(p)
    version = _need(obj, "format_version", int, "", path_s)
    if version != 1:
        raise ValueError(f"{p}: unsupported format_version {version} (this trainer reads 1)")
    classes = _need(obj, "classes", list, "", path_s)
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"{p}: key 'classes' must be a non-empty list of distinct strings")
    splits = {}
    for name, s in _need(obj, "splits", dict, "", path_s).items():
        w = f"splits.{name}."
        n = _need(s, "num_samples", int, w, path_s)
        ns = _need(s, "num_shards", int, w, path_s)
        counts = _need(s, "class_counts", list, w, path_s)
        shards = _need(s, "shards", list, w, path_s)
        if len(counts) != len(classes) or sum(counts) != n:
            raise ValueError(f"{p}: key '{w}class_counts' must have {len(classes)} entries summing to "
                             f"num_samples={n}, got {counts}")
        if ns != len(shards) or not all(isinstance(x, str) for x in shards):
            raise ValueError(f"{p}: key '{w}shards' must list num_shards={ns} names, got {len(shards)}")
        sizes = s.get("shard_sizes")
        if sizes is not None and (len(sizes) != ns or sum(sizes) != n):
            raise ValueError(f"{p}: key '{w}shard_sizes' must have {ns} entries summing to {n}")
        splits[name] = SplitMeta(num_samples=n, num_shards=ns, class_counts=list(counts), shards=list(shards),
                                 shard_sizes=sizes, num_skipped=int(s.get("num_skipped", 0)))
    extra = {k: v for k, v in obj.items() if k not in ("format_version", "classes", "splits")}
    return DatasetMeta(classes=list(classes), splits=splits, format_version=version, root=str(p.parent),
                       extra=extra)


# ----------------------------------------------------------------------------------------------
# shard lists and epoch length


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into a list of shard paths/URLs (order kept; every rank must pass the same).

    Accepted (also mixed in a list): a local file; a brace pattern ``train-{000000..000009}.tar``
    (braceexpand, as WebDataset); a glob ``shards/train-*.tar`` (sorted); a directory (all ``*.tar``
    inside, sorted); ``http(s)://`` or any other ``scheme://`` URL and ``pipe:`` commands (kept as
    they are, read through ``webdataset.gopen``: curl for http, the shell for pipe:).

    Raises:
        FileNotFoundError: a local path of the spec does not exist, or nothing matches (names the spec).
        ValueError: an empty list.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("resolve_shards: empty list of shard specs")
    out: list[str] = []
    for s in specs:
        s = os.fspath(s)
        found, missing = [], []
        for item in braceexpand.braceexpand(s):
            if item.startswith("pipe:") or (_URL_RE.match(item) and not item.startswith("file://")):
                found.append(item)
                continue
            path = os.path.expanduser(item[len("file://"):] if item.startswith("file://") else item)
            if os.path.isdir(path):
                found += sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            elif glob.has_magic(path):
                found += sorted(glob.glob(path))
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(path)
        if missing:
            raise FileNotFoundError(f"resolve_shards: {len(missing)} shard(s) of spec {s!r} not found, e.g. "
                                    f"{missing[:3]}")
        if not found:
            raise FileNotFoundError(f"resolve_shards: no shard matches spec {s!r}")
        out += found
    shown = specs[0] if len(specs) == 1 else f"{os.fspath(specs[0])} ... ({len(specs)} specs)"
    log.info("resolve_shards: %d shard(s) from %s", len(out), shown)
    return out


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps per epoch: ``ceil(num_samples / global_batch_size)``.

    ``num_samples`` comes from ``dataset.json`` (``splits.train.num_samples``); ``global_batch_size =
    micro_batch_size x grad_accum_steps x world_size``. Rounding up means one epoch feeds at least
    ``num_samples`` samples; the last step's surplus comes from the readers starting over on their
    shards. Pass ``steps_per_epoch(...) * grad_accum_steps`` micro-batches to
    :meth:`TrainLoader.epoch`.

    Raises:
        ValueError: ``num_samples`` or ``global_batch_size`` below 1.
    """
    if num_samples < 1 or global_batch_size < 1:
        raise ValueError(f"steps_per_epoch: need num_samples >= 1 and global_batch_size >= 1, got "
                         f"{num_samples} and {global_batch_size}")
    return math.ceil(num_samples / global_batch_size)


# ----------------------------------------------------------------------------------------------
# reading and decoding


class BadSampleError(RuntimeError):
    """A bad sample or unreadable shard under ``bad_samples='strict'``; the message is
    ``"shard_url:key: reason"``."""


class _BadSample(Exception):
    pass


def _seed_int(text: str) -> int:
    """Stable 63-bit seed from a string (independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class _ScopedTorchRNG:
    """A private torch CPU RNG stream, swapped in only around the transform (v2 transforms draw
    from the global generator)."""

    def __init__(self, seed: int):
        g = torch.Generator()
        g.manual_seed(seed)
        self.state = g.get_state()

    @contextmanager
    def active(self):
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)


def _iter_shard(url: str) -> Iterator[dict]:
    """Raw samples (dicts of bytes with ``__key__``) of one tar shard; read errors propagate."""
    stream = gopen(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        yield from group_by_keys(files, handler=reraise_exception)
    finally:
        try:
            stream.close()
        except Exception:  # a pipe/curl closed early exits non-zero; read errors were raised above
            pass


def _reason(exn: BaseException) -> str:
    msg = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {msg}".strip().rstrip(":")


def _decode_sample(sample: dict, transform: Callable, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """-> (transformed (3, S, S) uint8 image, label); raises _BadSample(reason)."""
    raw = sample.get("cls")
    if raw is None:
        raise _BadSample("no 'cls' label")
    try:
        label = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError):
        raise _BadSample(f"'cls' is not an integer: {bytes(raw)[:20]!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise _BadSample(f"label {label} outside [0, {num_classes})")
    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if data is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise _BadSample(f"no image field (have {fields}, want one of {IMAGE_EXTENSIONS})")
    fused = getattr(transform, "from_bytes", None)  # decode + augment in one step (reduced-size JPEG decode)
    try:
        return (fused(data) if fused is not None else transform(decode_image_bytes(data))), label
    except ImageDecodeError as exn:
        raise _BadSample(str(exn)) from None


@dataclass
class _WorkerState:
    skipped: list[str] = field(default_factory=list)  # reports not yet attached to a batch
    samples_per_pass: int | None = None  # raw samples in the first non-empty pass over the reader's shards


class _StreamBase(IterableDataset):
    """Shared decode + batch stage; subclasses produce ``(url, raw_sample)`` streams per reader."""

    def __init__(self, shards: list[str], *, rank: int, world_size: int, micro_batch_size: int,
                 transform: Callable, bad_samples: str, num_classes: int | None):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.micro_batch_size, self.transform = micro_batch_size, transform
        self.strict = bad_samples == "strict"
        self.num_classes = num_classes

    def _report(self, state: _WorkerState, url: str, key: str, reason: str) -> None:
        msg = f"{url}:{key}: {reason}"
        if self.strict:
            raise BadSampleError(msg)
        state.skipped.append(msg)

    def _read_shard(self, url: str, state: _WorkerState) -> Iterator[dict]:
        try:
            yield from _iter_shard(url)
        except BadSampleError:
            raise
        except Exception as exn:  # unreadable / truncated tar, missing file, curl failure...
            self._report(state, url, "<shard>", _reason(exn))

    def _read_urls(self, url: str, state: _WorkerState) -> Iterator[tuple[str, dict]]:
        for sample in self._read_shard(url, state):
            yield url, sample

    def _decode_or_report(self, url: str, sample: dict, state: _WorkerState) -> tuple[torch.Tensor, int, str] | None:
        """(image, label, key) of one raw sample, or None after reporting it as bad."""
        key = str(sample.get("__key__", "?"))
        try:
            image, label = _decode_sample(sample, self.transform, self.num_classes)
        except _BadSample as exn:
            self._report(state, url, key, str(exn))
            return None
        return image, label, key

    def _batches(self, items: Iterator[tuple[str, dict]], state: _WorkerState, rng: _ScopedTorchRNG,
                 bad_run_limit: Callable[[], int | None], describe: str) -> Iterator[dict]:
        bad_run = 0
        exhausted = False
        while not exhausted:
            decoded = []
            with rng.active():  # one RNG swap per batch; restored before the yield below
                while len(decoded) < self.micro_batch_size:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                        break
                    one = self._decode_or_report(*item, state)
                    if one is not None:
                        bad_run = 0
                        decoded.append(one)
                        continue
                    bad_run += 1
                    limit = bad_run_limit()
                    if limit is not None and bad_run > limit:
                        raise RuntimeError(f"{describe}: no decodable sample in a full pass over its shards "
                                           f"({bad_run} bad in a row); last: {state.skipped[-3:]}")
            if decoded:
                images, labels, keys = (list(column) for column in zip(*decoded))
                yield self._collate(images, labels, keys, state)
        if state.skipped:  # marker carrying the last reports; EvalLoader folds it into a real batch
            yield {"image": None, "label": None, "key": [], "skipped": state.skipped}
            state.skipped = []

    @staticmethod
    def _guard(batches: Iterator[dict]) -> Iterator[dict]:
        """Turn a worker-side error into an ``{"error": ...}`` item that the main process raises
        (an exception escaping a persistent DataLoader worker stalls its shutdown for 5 s)."""
        try:
            yield from batches
        except (BadSampleError, RuntimeError) as exn:
            while True:  # never end after an error: a persistent worker whose stream ended early
                yield {"error": exn}  # (iteration_end before the main process noticed) stalls shutdown

    @staticmethod
    def _collate(images, labels, keys, state: _WorkerState) -> dict:
        skipped, state.skipped = state.skipped, []
        # (B, 3, S, S) in channels_last memory: the augmented images are HWC in memory already, so this
        # is a plain copy per image (about 8% more images/s than a contiguous NCHW batch), and the model
        # wants channels_last anyway; default_collate stacks straight into shared memory in a worker
        image = default_collate([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
        return {"image": image, "label": torch.tensor(labels, dtype=torch.int64), "key": keys, "skipped": skipped}


class _TrainStream(_StreamBase):
    """Endless per-worker stream of training batches for the epoch in ``epoch_state[0]``."""

    def __init__(self, shards, *, seed: int, shuffle_buffer: int, resampled: bool, epoch_state: torch.Tensor,
                 **kw):
        super().__init__(shards, **kw)
        self.seed, self.shuffle_buffer, self.resampled = seed, shuffle_buffer, resampled
        self.epoch_state = epoch_state  # shared memory: set by TrainLoader.epoch, read by the workers

    def _raw(self, epoch: int, worker: int, num_workers: int, rng: random.Random, state: _WorkerState):
        if self.resampled:
            mine = list(self.shards)
        else:
            order = list(self.shards)
            random.Random(f"order/{self.seed}/{epoch}").shuffle(order)
            mine = order[self.rank::self.world_size][worker::num_workers]
        pass_len = len(mine)  # shards per pass (a pass = len(shards) draws when resampled)
        who = f"rank {self.rank} worker {worker}"
        empty_passes, n_in_pass, opened, passes = 0, 0, 0, 0
        while True:
            todo = [rng.choice(mine) for _ in range(pass_len)] if self.resampled else list(mine)
            if passes > 0 and not self.resampled:
                rng.shuffle(todo)
            pass_items = (item for url in todo for item in self._read_urls(url, state))
            if self.shuffle_buffer > 1:  # drained at the end of each pass: a pass yields each sample once
                pass_items = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(pass_items)
            for item in pass_items:
                n_in_pass += 1
                yield item
            opened += len(todo)
            passes += 1
            if state.samples_per_pass is None and n_in_pass > 0:
                state.samples_per_pass = n_in_pass
            if n_in_pass == 0:
                empty_passes += 1
                # a fixed shard list: one empty pass proves nothing is readable; resampled: allow bad luck
                if empty_passes >= (3 if self.resampled else 1):
                    raise RuntimeError(f"TrainLoader {who}: no sample could be read from its shards "
                                       f"{sorted(set(mine))[:5]} ({opened} opened); last: {state.skipped[-3:]}")
            else:
                empty_passes = 0
            n_in_pass = 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch_state[0])
        reader = f"{self.seed}/{epoch}/{self.rank}/{worker}"
        rng = random.Random(f"shuffle/{reader}")
        state = _WorkerState()
        items = self._raw(epoch, worker, num_workers, rng, state)
        margin = self.shuffle_buffer * (3 if self.resampled else 1)

        def limit():
            n = state.samples_per_pass
            return None if n is None else n * (3 if self.resampled else 1) + margin

        return self._guard(self._batches(items, state, _ScopedTorchRNG(_seed_int(f"augment/{reader}")), limit,
                                         f"TrainLoader rank {self.rank} worker {worker}"))


class _EvalStream(_StreamBase):
    """Finite per-worker stream; the readers together yield every sample exactly once."""

    def __init__(self, shards, *, num_workers: int, **kw):
        super().__init__(shards, **kw)
        self.num_readers = self.world_size * max(1, num_workers)

    def assignment(self, reader: int) -> list[tuple[str, int, int]]:
        """``[(shard, part, num_parts)]`` of reader ``reader`` (= rank * workers + worker): it keeps the
        samples of ``shard`` whose index ``j`` (in shard order) has ``j % num_parts == part``."""
        n, readers = len(self.shards), self.num_readers
        if n >= readers:
            return [(url, 0, 1) for url in self.shards[reader::readers]]
        s = reader % n
        return [(self.shards[s], reader // n, len(range(s, readers, n)))]

    def _raw(self, reader: int, state: _WorkerState):
        for url, part, parts in self.assignment(reader):
            for j, sample in enumerate(self._read_shard(url, state)):
                if j % parts == part:
                    yield url, sample

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.rank * num_workers + worker
        state = _WorkerState()
        return self._guard(self._batches(self._raw(reader, state), state,
                                         _ScopedTorchRNG(_seed_int(f"eval/{reader}")), lambda: None,
                                         f"EvalLoader rank {self.rank} worker {worker}"))


def _check_common(name: str, shards: list[str], rank: int, world_size: int, micro_batch_size: int,
                  num_workers: int, bad_samples: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if micro_batch_size < 1:
        raise ValueError(f"{name}: micro_batch_size must be >= 1, got {micro_batch_size}")
    if num_workers < 0:
        raise ValueError(f"{name}: num_workers must be >= 0, got {num_workers}")
    if bad_samples not in ("skip", "strict"):
        raise ValueError(f"{name}: bad_samples must be 'skip' or 'strict', got {bad_samples!r}")
    if not shards:
        raise ValueError(f"{name}: no shards")


def _make_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    kw = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
    # own generator: DataLoader draws its base seed from it instead of the caller's global RNG
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), **kw)


class TrainLoader:
    """Endless, rank-split, shuffled training batches; :meth:`epoch` yields exactly ``num_batches``.

    Args:
        shards: shard spec(s), see :func:`resolve_shards`; the same list on every rank.
        rank, world_size: this process's global rank and the number of processes.
        micro_batch_size: samples per batch (per rank, per forward pass).
        num_workers: DataLoader worker processes (0 = read in the main process); workers are
            persistent across epochs (the epoch number reaches them through shared memory).
        transform: ``(3, H, W) uint8 -> (3, S, S) uint8`` (see :func:`trainer.transforms.build_transforms`);
            when it has ``from_bytes(data) -> (3, S, S) uint8`` (the training transform), that is called on
            the encoded bytes instead of decode + transform (fused, reduced-size JPEG decoding).
        seed: base seed of shard order, shuffle buffer and augmentation (with epoch, rank, worker).
        shuffle_buffer: raw samples held per worker for shuffling (0 or 1: no buffer); memory is
            about ``shuffle_buffer x`` the mean encoded image size per worker.
        bad_samples: 'skip' (drop, report in ``batch["skipped"]``) or 'strict' (raise BadSampleError).
        resampled: each worker draws shards with replacement (for fewer shards than readers).
        pin_memory: pin batches for faster host-to-GPU copies (use on CUDA only).
        num_classes: if given, labels outside ``[0, num_classes)`` are bad samples.
        prefetch_factor: batches prefetched per worker.

    Raises:
        ValueError: fewer shards than ``world_size x max(num_workers, 1)`` readers (message names both
            numbers) unless ``resampled``; bad arguments (named).
        FileNotFoundError: from :func:`resolve_shards`.
    """

    def __init__(self, shards: str | Sequence[str], *, rank: int, world_size: int, micro_batch_size: int,
                 num_workers: int, transform: Callable, seed: int = 0, shuffle_buffer: int = 1000,
                 bad_samples: str = "skip", resampled: bool = False, pin_memory: bool = False,
                 num_classes: int | None = None, prefetch_factor: int = 2):
        self.shards = resolve_shards(shards)
        _check_common("TrainLoader", self.shards, rank, world_size, micro_batch_size, num_workers, bad_samples)
        self.readers = world_size * max(1, num_workers)
        if not resampled and len(self.shards) < self.readers:
            raise ValueError(
                f"TrainLoader: {len(self.shards)} shard(s) for {world_size} rank(s) x {max(1, num_workers)} "
                f"worker(s) = {self.readers} readers; every reader needs at least one shard. Write more, "
                f"smaller shards (make_shards.py --max_samples_per_shard), use fewer workers, or set "
                f"resampled=True (data.resampled) to draw shards with replacement.")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._epoch_state = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._dataset = _TrainStream(self.shards, rank=rank, world_size=world_size,
                                     micro_batch_size=micro_batch_size, transform=transform,
                                     bad_samples=bad_samples, num_classes=num_classes, seed=seed,
                                     shuffle_buffer=shuffle_buffer, resampled=resampled,
                                     epoch_state=self._epoch_state)
        self._loader: DataLoader | None = None

    def epoch(self, epoch: int, num_batches: int) -> Iterator[dict]:
        """Yield exactly ``num_batches`` batches of epoch ``epoch`` (same count on every rank).

        Batches: ``image`` (B, 3, S, S) uint8 (channels_last memory), ``label`` (B,) int64, ``key``
        list[str], ``skipped`` list[str]. Only one epoch iterator may be active at a time; starting
        the next one ends the previous (its prefetched batches, and their ``skipped`` reports, are
        dropped).

        Raises:
            ValueError: ``num_batches < 1`` or ``epoch < 0``. BadSampleError (strict mode), RuntimeError
            (a worker with nothing decodable), re-raised from the workers.
        """
        if num_batches < 1 or epoch < 0:
            raise ValueError(f"TrainLoader.epoch: need epoch >= 0 and num_batches >= 1, got {epoch}, {num_batches}")
        self._epoch_state[0] = epoch
        if self._loader is None:
            self._loader = _make_loader(self._dataset, self.num_workers, self.pin_memory, self.prefetch_factor)
        it = iter(self._loader)
        for _ in range(num_batches):
            try:
                batch = next(it)
            except StopIteration:  # cannot happen: the stream is endless
                raise RuntimeError("TrainLoader: the training stream ended early (bug)") from None
            if "error" in batch:  # a worker-side error (strict mode, nothing decodable)
                it = None  # noqa: F841  stop the workers now, by refcount: no exception->frame->iterator
                self.close()  # cycle, whose garbage collection stalls the DataLoader shutdown for 5 s
                raise batch.pop("error")
            yield batch

    def close(self) -> None:
        """Stop the persistent workers (a later :meth:`epoch` starts new ones)."""
        self._loader = None


class EvalLoader:
    """Every sample of ``shards`` exactly once over all ranks (finite; ranks may differ by a batch).

    Args: as :class:`TrainLoader` (no seed, shuffle or resampling). Works with fewer shards than
    readers (sample-level split inside shards, see the module docstring).

    Iterating yields batches in the :class:`TrainLoader` format; ``skipped`` reports that come after
    a worker's last batch are attached to the last batch of this rank; if this rank got no batch at
    all they are logged as a warning. :attr:`last_skipped` holds every report of the last pass.

    Raises:
        ValueError: bad arguments (named). FileNotFoundError: from :func:`resolve_shards`.
    """

    def __init__(self, shards: str | Sequence[str], *, rank: int, world_size: int, micro_batch_size: int,
                 num_workers: int, transform: Callable, bad_samples: str = "skip", pin_memory: bool = False,
                 num_classes: int | None = None, prefetch_factor: int = 2):
        self.shards = resolve_shards(shards)
        _check_common("EvalLoader", self.shards, rank, world_size, micro_batch_size, num_workers, bad_samples)
        self._dataset = _EvalStream(self.shards, rank=rank, world_size=world_size,
                                    micro_batch_size=micro_batch_size, transform=transform,
                                    bad_samples=bad_samples, num_classes=num_classes, num_workers=num_workers)
        self._loader = _make_loader(self._dataset, num_workers, pin_memory, prefetch_factor)
        self.last_skipped: list[str] = []

    def __iter__(self) -> Iterator[dict]:
        self.last_skipped = []
        held, pending = None, []
        for batch in self._loader:
            if "error" in batch:  # pop: the raised exception must not be reachable from this frame
                raise batch.pop("error")
            self.last_skipped += batch["skipped"]
            if batch["image"] is None:  # reports after a worker's last batch
                if held is not None:
                    held["skipped"] = held["skipped"] + batch["skipped"]
                else:
                    pending += batch["skipped"]
                continue
            batch["skipped"] = pending + batch["skipped"]
            pending = []
            if held is not None:
                yield held
            held = batch
        if held is not None:
            yield held
        elif pending:
            log.warning("EvalLoader rank %d: %d bad sample(s) and no good one: %s",
                        self._dataset.rank, len(pending), pending)
