"""Feature cache: compute a frozen backbone's features once, then train and evaluate only the head.

When the backbone is frozen entirely (``trainer.finetune.freezing.frozen_entirely``: feature extraction) and
the training transform is deterministic (``data.augment: none``), every epoch feeds the backbone the
same pixels and gets the same features back. With ``train.feature_cache: true`` the run therefore:

1. **first epoch** (while frozen): trains as usual and records, through a forward hook on
   ``model.backbone``, the ``(B, F)`` features of every training micro-batch of this rank together
   with its labels and sample keys (each key once: the last batch of an epoch may repeat samples);
   the first evaluation records the validation features (and the uint8 images, which the
   best-model reports need for the mistakes grid) in loader order;
2. **later epochs**: the loader is not started at all. Each rank draws ``num_batches`` micro-batches
   of ``micro_batch_size`` from *its own* cached samples, in a fresh permutation per epoch (seeded
   by ``(seed, epoch, rank)``, cycling when more samples are needed than cached), and evaluation
   replays the cached validation batches. Batches are ``{"features": (B, F) float32, "label": (B,)
   int64 (multi-label: the loader's ``(B, C)`` float32 label sets, kept as they are), "key": [str],
   "skipped": []}``; ``trainer.train.loop`` then runs only the head
   (``ImageClassifier.forward(features, features=True)``, through the DDP wrapper so gradients
   are still all-reduced).

Per rank: each rank caches the samples it read in the first epoch (``trainer.data`` gives each rank
its own shards) and every rank still runs the same number of micro-batches per epoch, so
collectives stay matched. The cache lives in host memory: ``N x F x 4`` bytes for features
(245 train samples x 1280 floats = 1.3 MB for ants/bees with EfficientNet-Lite0), plus
``3 x S x S`` bytes per validation image (150 KB at 224 px), recorded batch by batch (the loader's
batches are not kept). It is dropped as soon as a phase unfreezes any backbone parameter (features
change), and rebuilt if a later phase freezes it again.

Size limit: ``train.feature_cache_max_ram_fraction`` (default 0.25) of the host's RAM (or cgroup
limit), shared by the ranks of a node, may stay in RAM; what does not fit is written to
``<output_dir>/feature_cache/rank<r>_*.bin`` and read back memory-mapped (``trainer.train.spill``),
so a cache of 10M images x 1280 features (51 GB) runs on a 64 GB node at the speed of its page cache
and disk instead of running it out of memory. Spill files are deleted when the cache is dropped,
when the run ends, and at the start of a run (those of a killed one).

Assumptions (checked where possible): the frozen backbone is deterministic in train mode (no dropout
or stochastic depth inside the backbone; frozen BatchNorm runs in eval mode, ``trainer.finetune.freezing``).
A run resumed in the middle of an epoch records from the next full epoch on.

This is the classic "precompute bottleneck features" recipe (e.g. Keras' transfer-learning guide,
Yosinski et al. 2014 for frozen-feature transfer); accuracy matches an uncached run with
``augment: none`` up to the order in which samples are drawn (measured figures: docs/performance.md, feature cache).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from trainer.finetune.freezing import frozen_entirely
from trainer.train.spill import RamBudget, RowStore, fmt_bytes, host_ram_bytes
from trainer.data.seeds import seed_int

log = logging.getLogger(__name__)

__all__ = ["FeatureCache", "feature_cache_budget"]


def feature_cache_budget(fraction: float, world_size: int) -> dict:
    """``max_ram_bytes`` and ``budget_note`` for :class:`FeatureCache`: ``fraction`` of :func:`host_ram_bytes`
    divided among the ranks of this node (``LOCAL_WORLD_SIZE``, set by torchrun / accelerate; else
    ``world_size``)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or 1)
    ram = host_ram_bytes()
    return {"max_ram_bytes": int(fraction * ram / local),
            "budget_note": f"train.feature_cache_max_ram_fraction {fraction:g} of {fmt_bytes(ram)} RAM / "
                           f"{local} rank(s) per node"}


class _Recorder:
    """Forward hook on ``backbone`` pairing each forward's output with the batch yielded just before it.

    Each pair goes to ``on_record(features (B, F) float32 CPU, batch)`` at once (nothing is kept here,
    so the loader's images are not held for the whole epoch). After ``target`` records (if given)
    the hook removes itself and calls ``on_done()``: the caller's last ``next()`` is followed by a
    forward but never by another ``next()``, so the generator that yields the batches cannot see the
    end itself.
    """

    def __init__(self, backbone: nn.Module, on_record, target: int | None = None, on_done=None):
        self.pending: dict | None = None
        self.count = 0
        self.on_record, self.target, self.on_done = on_record, target, on_done
        self.done = False
        self.handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self.pending is None:  # a forward not fed by the recorded stream
            return
        batch, self.pending = self.pending, None
        feats = output.detach().reshape(output.shape[0], -1)
        # an explicit copy: .float().cpu() of a CPU float32 tensor would alias the activation
        self.on_record(feats.to("cpu", torch.float32, copy=True), batch)
        self.count += 1
        if self.target is not None and self.count == self.target:
            self.close()
            self.done = True
            if self.on_done is not None:
                self.on_done()

    def close(self) -> None:
        self.handle.remove()


class FeatureCache:
    """Per-rank cache of frozen-backbone features for the training and validation splits.

    Args:
        seed: base seed of the per-epoch sample order (``train.seed``).
        rank: this process's rank (only used in the seed: each rank draws from its own samples).
        micro_batch_size: samples per cached training batch (``train.micro_batch_size``).
        spill_dir: folder for spill files (``<output_dir>/feature_cache``); None: always in RAM.
        max_ram_bytes: bytes this rank's cache may keep in RAM (features, val images) before the
            rest goes to memory-mapped files in ``spill_dir`` (``trainer.train.spill``); None: no limit.
        budget_note: how ``max_ram_bytes`` was derived, for the spill log line.

    Use (``trainer/train/epoch.py``)::

        cache = FeatureCache(seed=cfg.train.seed, rank=rank, micro_batch_size=cfg.train.micro_batch_size)
        batches = cache.train_batches(model, train_loader.epoch(e, n), epoch=e, num_batches=n)
        ...train_step(ddp_model, batches, ...)
        res = evaluate(model, cache.eval_batches(model, eval_loader), ...)
    """

    def __init__(self, *, seed: int, rank: int, micro_batch_size: int, spill_dir: str | Path | None = None,
                 max_ram_bytes: int | None = None, budget_note: str = ""):
        if micro_batch_size < 1:
            raise ValueError(f"FeatureCache: micro_batch_size must be >= 1, got {micro_batch_size}")
        self.seed, self.rank, self.micro_batch_size = seed, rank, micro_batch_size
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.budget = RamBudget(max_ram_bytes, budget_note)
        self.train_features: torch.Tensor | None = None  # (N, F) float32, CPU (RAM or memory-mapped)
        self.train_labels: torch.Tensor | None = None  # (N,) int64, multi-label (N, C) float32 label sets
        self.train_keys: list[str] = []
        self.val_batches: list[dict] | None = None
        self._stores: list[RowStore] = []
        self._warned = False
        self._remove_spill_files()  # left by a killed run: the cache is rebuilt from the data anyway

    def _store(self, name: str) -> RowStore:
        st = RowStore(self.spill_dir, f"rank{self.rank}_{name}", self.budget)
        self._stores.append(st)
        return st

    def _remove_spill_files(self) -> None:
        if self.spill_dir is not None and self.spill_dir.is_dir():
            for f in self.spill_dir.glob(f"rank{self.rank}_*.bin"):
                f.unlink()

    @property
    def spilled(self) -> bool:
        """Whether some of the cache lives in spill files."""
        return any(st.spilled for st in self._stores)

    # ------------------------------------------------------------------------------------------
    def usable(self, model: nn.Module) -> bool:
        """Whether ``model``'s backbone (plain :class:`trainer.models.classifier.ImageClassifier`, not DDP) is frozen
        entirely; if not, the cache is dropped (the features are about to change)."""
        ok = frozen_entirely(model)
        if not ok and (self.train_features is not None or self.val_batches is not None):
            log.info("feature cache: backbone has trainable parameters now; cache dropped")
            self.clear()
        if not ok and not self._warned:
            log.info("feature cache: inactive while the backbone trains (it only applies to a frozen backbone)")
            self._warned = True
        return ok

    def clear(self) -> None:
        """Forget all cached features (and delete this rank's spill files)."""
        self.train_features, self.train_labels, self.train_keys, self.val_batches = None, None, [], None
        for st in self._stores:
            st.discard()
        self._stores = []
        self._remove_spill_files()

    @property
    def num_train_samples(self) -> int:
        """Distinct training samples cached on this rank (0 before the first complete epoch)."""
        return 0 if self.train_features is None else int(self.train_features.shape[0])

    # ------------------------------------------------------------------------------------------
    def train_batches(self, model: nn.Module, loader_batches: Iterable[dict], *, epoch: int, num_batches: int,
                      start_batch: int = 0) -> Iterator[dict]:
        """This epoch's training micro-batches: from the cache if it is complete, else the loader's
        (recorded, if this epoch starts at its first batch and the backbone is frozen).

        Args:
            model: the plain classifier (``trainer.distributed.accelerator.unwrap``), whose ``backbone`` is hooked.
            loader_batches: the loader's iterator for this epoch (``TrainLoader.epoch``; a generator,
                so it reads nothing when the cache serves the epoch).
            epoch: epoch number (seeds the sample order).
            num_batches: micro-batches of this epoch (same on every rank).
            start_batch: micro-batches the caller will skip (mid-epoch resume); recording needs 0.

        Returns:
            an iterator of exactly ``num_batches`` batches: loader batches, or ``{"features": (B, F)
            float32, "label": (B,) int64, "key": list[str], "skipped": []}``.

        Raises:
            ValueError: ``num_batches < 1``.
        """
        if num_batches < 1:
            raise ValueError(f"FeatureCache.train_batches: num_batches must be >= 1, got {num_batches}")
        if not self.usable(model):
            return iter(loader_batches)
        if self.train_features is not None:
            return self._cached_train(epoch, num_batches)
        if start_batch != 0:
            return iter(loader_batches)
        return self._record_train(model, loader_batches, num_batches)

    def _record_train(self, model: nn.Module, loader_batches: Iterable[dict], num_batches: int) -> Iterator[dict]:
        feats, seen, labels, keys = self._store("train_features"), set(), [], []

        def on_record(f: torch.Tensor, batch: dict) -> None:
            new = [j for j, k in enumerate(batch["key"]) if k not in seen]  # the last batch may repeat samples
            if not new:
                return
            idx = torch.tensor(new, dtype=torch.int64)
            feats.append(f[idx])
            labels.append(batch["label"].cpu()[idx])
            for j in new:
                seen.add(batch["key"][j])
                keys.append(batch["key"][j])

        def on_done() -> None:
            if keys:
                self.train_features, self.train_labels, self.train_keys = feats.finish(), torch.cat(labels), keys
                log.info("feature cache: %d training samples x %d features cached on rank %d%s", len(keys),
                         self.train_features.shape[1], self.rank, f" (in {feats.path})" if feats.spilled else "")

        rec = _Recorder(model.backbone, on_record, target=num_batches, on_done=on_done)
        try:
            for i, batch in enumerate(loader_batches):
                if i == num_batches:
                    break
                rec.pending = batch
                yield batch
        finally:  # closed early (preemption, max_steps) or exhausted: never leave the hook behind
            rec.close()
            if not rec.done:
                feats.discard()

    def _cached_train(self, epoch: int, num_batches: int) -> Iterator[dict]:
        n, b = self.num_train_samples, self.micro_batch_size
        g = torch.Generator().manual_seed(seed_int(f"feature_cache/{self.seed}/{epoch}/{self.rank}"))
        order = torch.empty(0, dtype=torch.int64)
        for i in range(num_batches):
            while order.numel() < b:
                order = torch.cat([order, torch.randperm(n, generator=g)])
            idx, order = order[:b], order[b:]
            yield {"features": self.train_features[idx], "label": self.train_labels[idx],
                   "key": [self.train_keys[j] for j in idx.tolist()], "skipped": []}

    # ------------------------------------------------------------------------------------------
    def eval_batches(self, model: nn.Module, loader: Iterable[dict]) -> Iterator[dict]:
        """This evaluation's batches: cached ones if complete, else the loader's (recorded when frozen).

        Cached batches hold ``features`` (B, F) float32, ``label``, ``key``, ``image`` (B, 3, S, S)
        uint8 (for the reports) and an empty ``skipped``, in the order of the recorded pass.
        """
        if not self.usable(model):
            return iter(loader)
        if self.val_batches is not None:
            return iter(self.val_batches)
        return self._record_eval(model, loader)

    def _record_eval(self, model: nn.Module, loader: Iterable[dict]) -> Iterator[dict]:
        feats, images = self._store("val_features"), self._store("val_images")
        labels, keys, sizes = [], [], []

        def on_record(f: torch.Tensor, batch: dict) -> None:
            feats.append(f)
            images.append(batch["image"])
            labels.append(batch["label"].cpu())
            keys.extend(batch["key"])
            sizes.append(len(batch["key"]))

        rec = _Recorder(model.backbone, on_record)
        n = 0
        try:
            for batch in loader:
                rec.pending = batch
                n += 1
                yield batch
        finally:
            rec.close()
        if rec.count != n:  # some batch was not forwarded: do not trust the pairing
            log.warning("feature cache: %d validation batches but %d forwards; not cached", n, rec.count)
            feats.discard()
            images.discard()
            return
        if n == 0:  # this rank has no validation samples
            self.val_batches = []
            return
        f_all, im_all, y_all = feats.finish(), images.finish(), torch.cat(labels)
        self.val_batches, start = [], 0
        for b in sizes:
            self.val_batches.append({"features": f_all[start:start + b], "label": y_all[start:start + b],
                                     "key": keys[start:start + b], "image": im_all[start:start + b], "skipped": []})
            start += b
        log.info("feature cache: %d validation samples cached on rank %d%s", start, self.rank,
                 " (spilled to " + str(self.spill_dir) + ")" if feats.spilled or images.spilled else "")
