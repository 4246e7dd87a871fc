"""The inner loop: one optimizer step over ``grad_accum_steps`` micro-batches, and evaluation.

No file or network I/O here; the caller (``trainer/train/trainer.py``) owns data, checkpoints and logging.
Per step there is no host-device synchronisation: losses are summed on the device and only read
(``.item()``) by the caller at logging time.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from trainer.reporting.metrics import EvalAccumulator, EvalResult
from trainer.reporting.multilabel_eval import MultiLabelAccumulator, MultiLabelResult


def _forward(model: torch.nn.Module, batch: dict, device: torch.device, augment=None):
    """Logits ``(B, C)`` and labels ``(B,)`` (multi-label: ``(B, C)`` float label sets) of one batch moved to
    ``device``: ``image`` ``(B, 3, H, W)
    uint8`` (the model normalises it and sets its memory format; the loaders deliver channels_last
    memory, so that conversion is free), or cached backbone features ``features: (B, F) float32``
    (``trainer.train.feature_cache``, head only). ``augment`` (training only,
    :class:`trainer.data.batch_augment.BatchAugment`) turns the uint8 images into normalised, erased /
    mixed float32 images and the labels into its targets (``(B, C)`` soft labels when mixing)."""
    labels = batch["label"].to(device, non_blocking=True)
    if "features" in batch:
        return model(batch["features"].to(device, non_blocking=True), features=True), labels
    images = batch["image"].to(device, non_blocking=True)
    if augment is not None:
        images, labels = augment(images, labels)
    return model(images), labels


def train_step(model: torch.nn.Module, micro_batches: Iterable[dict], *, optimizer, criterion, accelerator,
               grad_accum_steps: int, grad_clip: float | None, batch_augment=None) -> torch.Tensor:
    """One optimizer step: forward/backward over ``grad_accum_steps`` micro-batches, then ``optimizer.step()``.

    Gradients are only all-reduced on the last micro-batch (``no_sync`` on the others), as in
    PyTorch's DDP gradient-accumulation recipe.

    Args:
        model: the (possibly DDP-wrapped) classifier, in train mode.
        micro_batches: iterator yielding at least ``grad_accum_steps`` batches ``{"image": (B, 3, H, W)
            uint8, "label": (B,) int64}``, or feature batches ``{"features": (B, F) float32, "label": (B,) int64}`` from
            ``trainer.train.feature_cache`` (then only the head runs).
        optimizer: an Accelerate-prepared optimizer (handles the fp16 grad scaler).
        criterion: loss(logits (B, C), labels (B,)) -> scalar mean over the micro-batch (multi-label: labels
            ``(B, C)`` float label sets, :func:`trainer.finetune.losses.build_criterion`).
        grad_clip: max global gradient norm (None: no clipping).
        batch_augment: optional on-device augmentation of each image micro-batch (mixup / cutmix /
            random erasing, :mod:`trainer.data.batch_augment`); ``criterion`` must accept its targets.

    Returns:
        Sum over micro-batches of the mean micro-batch loss / grad_accum_steps, a 0-dim tensor on the
        device (detached), i.e. the mean loss of this step on this rank.
    """
    device = accelerator.device
    total = torch.zeros((), device=device)
    it = iter(micro_batches)
    for i in range(grad_accum_steps):
        batch = next(it)
        last = i == grad_accum_steps - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with accelerator.autocast():
                logits, labels = _forward(model, batch, device, augment=batch_augment)
                loss = criterion(logits.float(), labels) / grad_accum_steps
            accelerator.backward(loss)
        total += loss.detach()
    if grad_clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterator[dict], *, num_classes: int, accelerator,
             on_batch=None, multilabel: bool = False, thresholds=None) -> EvalResult | MultiLabelResult:
    """Evaluate on this rank's share of the validation data and reduce over ranks.

    Every rank must call this (it ends in one ``all_reduce``), also a rank that received no batch.

    Args:
        model: the plain (unwrapped) classifier; put in eval mode here.
        batches: this rank's validation batches (each sample on exactly one rank).
        on_batch: optional callback ``(batch, logits (B, C) float32 on CPU) -> None`` (predictions CSV).
        multilabel: ``data.task: multilabel``: labels are ``(B, C)`` label sets, metrics from
            :class:`trainer.reporting.multilabel_eval.MultiLabelAccumulator`.
        thresholds: multi-label only: ``(C,)`` thresholds to evaluate at (a checkpoint's); None: chosen on this data.

    Returns:
        EvalResult (multi-label: MultiLabelResult) over all ranks (equal to a single-process evaluation).
    """
    was_training = model.training
    model.eval()
    acc = MultiLabelAccumulator(num_classes, accelerator.device, thresholds=thresholds) if multilabel \
        else EvalAccumulator(num_classes, accelerator.device)
    for batch in batches:
        with accelerator.autocast():
            logits, labels = _forward(model, batch, accelerator.device)
            logits = logits.float()
        acc.update(logits, labels)
        if on_batch is not None:
            on_batch(batch, logits.cpu())
    model.train(was_training)
    return acc.reduce(accelerator)


