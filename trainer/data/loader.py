"""TrainLoader / EvalLoader: DataLoaders over the rank- and worker-split shard streams of :mod:`trainer.data.stream`.

Worker processes and the cores (:func:`worker_init`): each worker runs torch with one intra-op thread
(decoding is single-threaded: libjpeg-turbo, simplejpeg, PIL) and at a lower scheduling priority
(``os.nice(WORKER_NICE)``). The training process uses every core for its own torch threads
(:func:`trainer.distributed.accelerator.configure_threads`); on a CPU-only machine the workers then compete with
those threads for the same cores, and a worker that pre-empts one OpenMP thread in the middle of a
parallel region stalls all of them at the region's barrier. With the workers niced, the scheduler runs
them in the gaps of the training process (and whenever it waits for a batch), so decoding costs its
CPU time and no more. ``WORKER_NICE`` only lowers the workers' priority relative to their own training
process (nice is per process; it never raises anything), and it does not matter on a GPU machine with
spare cores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import (
    DataLoader,
    IterableDataset,
)

from trainer.config.fields import ConfigError
from trainer.data.sources import resolve_shards
from trainer.data.stream import EvalStream, _TrainStream

log = logging.getLogger(__name__)


TASKS = ("multiclass", "multilabel")
"""Values of the loaders' ``task`` (``data.task``)."""


def _check_common(name: str, shards: list[str], rank: int, world_size: int, micro_batch_size: int,
                  num_workers: int, bad_samples: str, task: str = "multiclass", num_classes: int | None = None) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if micro_batch_size < 1:
        raise ValueError(f"{name}: micro_batch_size must be >= 1, got {micro_batch_size}")
    if num_workers < 0:
        raise ValueError(f"{name}: num_workers must be >= 0, got {num_workers}")
    if bad_samples not in ("skip", "strict"):
        raise ValueError(f"{name}: bad_samples must be 'skip' or 'strict', got {bad_samples!r}")
    if task not in TASKS:
        raise ValueError(f"{name}: task must be one of {list(TASKS)}, got {task!r}")
    if task == "multilabel" and (num_classes is None or num_classes < 1):
        raise ValueError(f"{name}: task='multilabel' needs num_classes >= 1 (the multi-hot length), got {num_classes}")
    if not shards:
        raise ValueError(f"{name}: no shards")


WORKER_NICE = 10
"""Niceness added to each DataLoader worker process (0: same priority as the training process)."""

WORKER_TORCH_THREADS = 1
"""torch intra-op threads in each DataLoader worker."""


def worker_init(worker_id: int, nice: int = WORKER_NICE) -> None:
    """DataLoader ``worker_init_fn``: one torch thread, priority lowered by ``nice`` (default
    :data:`WORKER_NICE`, see the module docstring). Runs in the worker process, before its first sample."""
    torch.set_num_threads(WORKER_TORCH_THREADS)
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not permitted here: the worker keeps the training process's priority
            pass


def _make_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    kw = {"prefetch_factor": prefetch_factor, "persistent_workers": True,
          "worker_init_fn": functools.partial(worker_init, nice=WORKER_NICE)} if num_workers > 0 else {}
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
        transform: ``(3, H, W) uint8 -> (3, S, S) uint8`` (see :func:`trainer.data.transforms.build_transforms`);
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
        task: ``multiclass`` (``cls`` labels -> ``label`` (B,) int64) or ``multilabel`` (``labels.json`` label
            sets -> ``label`` (B, num_classes) float32 multi-hot; needs ``num_classes``).

    Raises:
        ConfigError: fewer shards than ``world_size x max(num_workers, 1)`` readers (message names both
            numbers and ``data.num_workers``) unless ``resampled``.
        ValueError: bad arguments (named).
        FileNotFoundError: from :func:`resolve_shards`.
    """

    def __init__(self, shards: str | Sequence[str], *, rank: int, world_size: int, micro_batch_size: int,
                 num_workers: int, transform: Callable, seed: int = 0, shuffle_buffer: int = 1000,
                 bad_samples: str = "skip", resampled: bool = False, pin_memory: bool = False,
                 num_classes: int | None = None, prefetch_factor: int = 2, task: str = "multiclass"):
        self.shards = resolve_shards(shards)
        _check_common("TrainLoader", self.shards, rank, world_size, micro_batch_size, num_workers, bad_samples,
                      task, num_classes)
        self.readers = world_size * max(1, num_workers)
        if not resampled and len(self.shards) < self.readers:
            raise ConfigError(
                f"data.num_workers: {len(self.shards)} shard(s) for {world_size} rank(s) x {max(1, num_workers)} "
                f"worker(s) = {self.readers} readers; every reader needs at least one training shard. "
                f"Write more, smaller shards (data.samples_per_shard, make_shards.py --max_samples_per_shard), "
                f"use fewer workers, or set data.resampled=true to draw shards with replacement.")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._epoch_state = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._dataset = _TrainStream(self.shards, rank=rank, world_size=world_size,
                                     micro_batch_size=micro_batch_size, transform=transform,
                                     bad_samples=bad_samples, num_classes=num_classes, seed=seed,
                                     shuffle_buffer=shuffle_buffer, resampled=resampled,
                                     epoch_state=self._epoch_state, multilabel=task == "multilabel")
        self._loader: DataLoader | None = None

    def epoch(self, epoch: int, num_batches: int) -> Iterator[dict]:
        """Yield exactly ``num_batches`` batches of epoch ``epoch`` (same count on every rank).

        Batches: ``image`` (B, 3, S, S) uint8 (channels_last memory), ``label`` (B,) int64 (``multilabel``:
        (B, C) float32 multi-hot), ``key`` list[str], ``skipped`` list[str]. Only one epoch iterator may be
        active at a time; starting the next one ends the previous (its prefetched batches, and their
        ``skipped`` reports, are dropped).

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

    Args: as :class:`TrainLoader` (no seed, shuffle or resampling; ``task`` included). Works with fewer shards than
    readers (sample-level split inside shards, see the module docstring).

    Iterating yields batches in the :class:`TrainLoader` format; ``skipped`` reports that come after
    a worker's last batch are attached to the last batch of this rank; if this rank got no batch at
    all they are logged as a warning. :attr:`last_skipped` holds every report of the last pass.

    Raises:
        ValueError: bad arguments (named). FileNotFoundError: from :func:`resolve_shards`.
    """

    def __init__(self, shards: str | Sequence[str], *, rank: int, world_size: int, micro_batch_size: int,
                 num_workers: int, transform: Callable, bad_samples: str = "skip", pin_memory: bool = False,
                 num_classes: int | None = None, prefetch_factor: int = 2, stride: int = 1,
                 task: str = "multiclass"):
        self.shards = resolve_shards(shards)
        _check_common("EvalLoader", self.shards, rank, world_size, micro_batch_size, num_workers, bad_samples,
                      task, num_classes)
        self._dataset = EvalStream(self.shards, rank=rank, world_size=world_size,
                                   micro_batch_size=micro_batch_size, transform=transform,
                                   bad_samples=bad_samples, num_classes=num_classes, num_workers=num_workers,
                                   stride=stride, multilabel=task == "multilabel")
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




@dataclass(frozen=True)
class RunLoaders:
    """A run's loaders: ``train`` (:class:`TrainLoader`), ``eval`` (:class:`EvalLoader` of the val split), the
    eval transform and loader arguments (the linear probe reads the train split with them), the eval batch."""

    train: "TrainLoader"
    eval: "EvalLoader"
    eval_transform: Callable
    common: dict
    eval_batch_size: int


def build_run_loaders(cfg, pre, *, rank: int, world_size: int, device_type: str, train_shards, val_shards,
                      num_classes: int) -> RunLoaders:
    """The train and val loaders of a run of ``cfg`` (``data.*``, ``train.micro_batch_size`` / ``eval_batch_size``
    / ``seed``) with the model's preprocessing ``pre`` (``input_size``, ``crop_pct``, ``interpolation``).

    Raises:
        ConfigError: shards that do not fit the ranks and workers (names the field).
    """
    from trainer.data.transforms import build_transforms

    d = cfg.data
    train_tf = build_transforms(pre.input_size, train=True, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                                augment=d.augment, scale=tuple(d.crop_scale), auto_augment=d.auto_augment,
                                auto_augment_magnitude=d.auto_augment_magnitude, auto_augment_ops=d.auto_augment_ops)
    eval_tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    common = dict(rank=rank, world_size=world_size, num_workers=d.num_workers, bad_samples=d.bad_samples,
                  num_classes=num_classes, pin_memory=d.pin_memory and device_type == "cuda", task=d.task)
    train = TrainLoader(train_shards, micro_batch_size=cfg.train.micro_batch_size, transform=train_tf,
                        seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, **common)
    eval_batch = cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
    return RunLoaders(train, EvalLoader(val_shards, micro_batch_size=eval_batch, transform=eval_tf, **common),
                      eval_tf, common, eval_batch)
