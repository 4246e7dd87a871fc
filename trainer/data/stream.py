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

**Bad samples**: a sample without a ``cls`` label (``multilabel``: a ``labels.json`` label set), without an
image, or whose image does not decode (truncated JPEG, random bytes) is dropped; ``"shard_url:key: reason"``
goes into the ``skipped`` list of the next batch of that worker (for the main loop to count and log). A shard
that cannot be read (missing, truncated tar) reports ``"shard_url:<shard>: reason"``. ``bad_samples="strict"``
raises :class:`BadSampleError` with the same text instead. A worker that gets no decodable sample from a
full pass over its shards raises instead of spinning forever.

Batches (dicts): ``image`` (B, 3, S, S) uint8, ``label`` (B,) int64 (``multilabel``: (B, C) float32
multi-hot, 1.0 for each class in the sample's label set), ``key`` list[str] (``__key__`` of each sample),
``skipped`` list[str].
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import (
    IterableDataset,
    default_collate,
    get_worker_info,
)
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from trainer.data.decode import ImageDecodeError, decode_image_bytes
from trainer.data.extensions import IMAGE_FIELDS
from trainer.data.multilabel import loads_labels
from trainer.data.seeds import seed_int

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# reading and decoding


class BadSampleError(RuntimeError):
    """A bad sample or unreadable shard under ``bad_samples='strict'``; the message is
    ``"shard_url:key: reason"``."""


class SampleError(Exception):
    """One sample that cannot be used (no label, bad label, undecodable image); the message is the reason.
    Raised by :func:`decode_sample`; the streams skip or report the sample."""


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


def iter_shard(url: str) -> Iterator[dict]:
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


def error_reason(exn: BaseException) -> str:
    """``"TypeName: message"`` of an exception, one line for skip reports."""
    msg = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {msg}".strip().rstrip(":")


def sample_label_set(sample: dict, num_classes: int | None) -> tuple[int, ...]:
    """The label set of a multi-label raw sample (``labels.json``, :mod:`trainer.data.shard_writer`): sorted,
    distinct class indices. Raises SampleError(reason): no ``labels.json`` (a single-label sample names
    ``data.task``), not a JSON list of integers, an index outside ``[0, num_classes)``."""
    raw = sample.get("labels.json")
    if raw is None:
        raise SampleError("no 'labels.json' label set" + (" (a single-label sample: its shards were written for "
                                                          "data.task: multiclass)" if "cls" in sample else ""))
    try:
        return loads_labels(raw, num_classes)
    except ValueError as exn:
        raise SampleError(str(exn)) from None


def decode_sample(sample: dict, transform: Callable, num_classes: int | None,
                  multilabel: bool = False) -> tuple[torch.Tensor, int | torch.Tensor]:
    """-> (transformed (3, S, S) uint8 image, label): the ``cls`` integer, or with ``multilabel`` the
    (``num_classes``,) float32 multi-hot vector of :func:`sample_label_set`; raises SampleError(reason)."""
    if multilabel:
        if num_classes is None:
            raise ValueError("decode_sample: multilabel needs num_classes (the multi-hot length)")
        label = torch.zeros(num_classes, dtype=torch.float32)
        for y in sample_label_set(sample, num_classes):
            label[y] = 1.0
    else:
        raw = sample.get("cls")
        if raw is None:
            raise SampleError("no 'cls' label" + (" (a multi-label sample, 'labels.json': set data.task: "
                                                  "multilabel)" if "labels.json" in sample else ""))
        try:
            label = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
        except (ValueError, UnicodeDecodeError):
            raise SampleError(f"'cls' is not an integer: {bytes(raw)[:20]!r}") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise SampleError(f"label {label} outside [0, {num_classes})")
    data = next((sample[e] for e in IMAGE_FIELDS if e in sample), None)
    if data is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(f"no image field (have {fields}, want one of {IMAGE_FIELDS})")
    fused = getattr(transform, "from_bytes", None)  # decode + augment in one step (reduced-size JPEG decode)
    try:
        return (fused(data) if fused is not None else transform(decode_image_bytes(data))), label
    except ImageDecodeError as exn:
        raise SampleError(str(exn)) from None


@dataclass
class WorkerState:
    """Per-worker bookkeeping of a stream: skip reports not yet attached to a batch, samples per pass."""

    skipped: list[str] = field(default_factory=list)  # reports not yet attached to a batch
    samples_per_pass: int | None = None  # raw samples in the first non-empty pass over the reader's shards


class _StreamBase(IterableDataset):
    """Shared decode + batch stage; subclasses produce ``(url, raw_sample)`` streams per reader."""

    def __init__(self, shards: list[str], *, rank: int, world_size: int, micro_batch_size: int,
                 transform: Callable, bad_samples: str, num_classes: int | None, multilabel: bool = False):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.micro_batch_size, self.transform = micro_batch_size, transform
        self.strict = bad_samples == "strict"
        self.num_classes, self.multilabel = num_classes, multilabel

    def _report(self, state: WorkerState, url: str, key: str, reason: str) -> None:
        msg = f"{url}:{key}: {reason}"
        if self.strict:
            raise BadSampleError(msg)
        state.skipped.append(msg)

    def _read_shard(self, url: str, state: WorkerState) -> Iterator[dict]:
        try:
            yield from iter_shard(url)
        except BadSampleError:
            raise
        except Exception as exn:  # unreadable / truncated tar, missing file, curl failure...
            self._report(state, url, "<shard>", error_reason(exn))

    def _read_urls(self, url: str, state: WorkerState) -> Iterator[tuple[str, dict]]:
        for sample in self._read_shard(url, state):
            yield url, sample

    def _decode_or_report(self, url: str, sample: dict, state: WorkerState) -> tuple[torch.Tensor, object, str] | None:
        """(image, label, key) of one raw sample, or None after reporting it as bad."""
        key = str(sample.get("__key__", "?"))
        try:
            image, label = decode_sample(sample, self.transform, self.num_classes, self.multilabel)
        except SampleError as exn:
            self._report(state, url, key, str(exn))
            return None
        return image, label, key

    def _batches(self, items: Iterator[tuple[str, dict]], state: WorkerState, rng: _ScopedTorchRNG,
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
    def _collate(images, labels, keys, state: WorkerState) -> dict:
        """One batch dict (format: module docstring); ``labels`` are ints, or multi-hot (C,) float32 vectors."""
        skipped, state.skipped = state.skipped, []
        # (B, 3, S, S) in channels_last memory: the augmented images are HWC in memory already, so this
        # is a plain copy per image (about 8% more images/s than a contiguous NCHW batch), and the model
        # wants channels_last anyway; default_collate stacks straight into shared memory in a worker
        image = default_collate([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
        label = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels, dtype=torch.int64)
        return {"image": image, "label": label, "key": keys, "skipped": skipped}


class _TrainStream(_StreamBase):
    """Endless per-worker stream of training batches for the epoch in ``epoch_state[0]``."""

    def __init__(self, shards, *, seed: int, shuffle_buffer: int, resampled: bool, epoch_state: torch.Tensor,
                 **kw):
        super().__init__(shards, **kw)
        self.seed, self.shuffle_buffer, self.resampled = seed, shuffle_buffer, resampled
        self.epoch_state = epoch_state  # shared memory: set by TrainLoader.epoch, read by the workers

    def _raw(self, epoch: int, worker: int, num_workers: int, rng: random.Random, state: WorkerState):
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
        state = WorkerState()
        items = self._raw(epoch, worker, num_workers, rng, state)
        margin = self.shuffle_buffer * (3 if self.resampled else 1)

        def limit():
            n = state.samples_per_pass
            return None if n is None else n * (3 if self.resampled else 1) + margin

        return self._guard(self._batches(items, state, _ScopedTorchRNG(seed_int(f"augment/{reader}")), limit,
                                         f"TrainLoader rank {self.rank} worker {worker}"))


class EvalStream(_StreamBase):
    """Finite per-worker stream; the readers together yield every sample exactly once."""

    def __init__(self, shards, *, num_workers: int, stride: int = 1, **kw):
        super().__init__(shards, **kw)
        self.num_readers = self.world_size * max(1, num_workers)
        self.stride = max(1, stride)  # keep every stride-th sample of each shard (before decoding)

    def assignment(self, reader: int) -> list[tuple[str, int, int]]:
        """``[(shard, part, num_parts)]`` of reader ``reader`` (= rank * workers + worker): it keeps the
        samples of ``shard`` whose index ``j`` (in shard order) has ``j % num_parts == part``."""
        n, readers = len(self.shards), self.num_readers
        if n >= readers:
            return [(url, 0, 1) for url in self.shards[reader::readers]]
        s = reader % n
        return [(self.shards[s], reader // n, len(range(s, readers, n)))]

    def _raw(self, reader: int, state: WorkerState):
        for url, part, parts in self.assignment(reader):
            for j, sample in enumerate(self._read_shard(url, state)):
                if j % parts == part and j % self.stride == 0:
                    yield url, sample

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.rank * num_workers + worker
        state = WorkerState()
        return self._guard(self._batches(self._raw(reader, state), state,
                                         _ScopedTorchRNG(seed_int(f"eval/{reader}")), lambda: None,
                                         f"EvalLoader rank {self.rank} worker {worker}"))




