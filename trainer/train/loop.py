"""The inner loop: one optimizer step over ``grad_accum_steps`` micro-batches, and evaluation.

No file or network I/O here; the caller (``trainer/train/trainer.py``) owns data, checkpoints and logging.
Per step there is no host-device synchronisation: losses are summed on the device and only read
(``.item()``) by the caller at logging time.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from trainer.data.transforms import normalize
from trainer.reporting.metrics import EvalAccumulator, EvalResult


def to_device(batch: dict, device: torch.device, *, channels_last: bool, non_blocking: bool = True):
    """Move a loader batch to ``device``.

    Args:
        batch: ``{"image": (B, 3, H, W) uint8, "label": (B,) int64, ...}``; the loaders deliver the
            images in channels_last memory already (then the conversion below is free).
        channels_last: images in channels_last memory format (True) or contiguous NCHW (False).

    Returns:
        (images (B, 3, H, W) uint8 on device, labels (B,) int64 on device).
    """
    images = batch["image"].to(device, non_blocking=non_blocking)
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return images, batch["label"].to(device, non_blocking=non_blocking)


def _forward(model: torch.nn.Module, batch: dict, device: torch.device, *, mean, std, channels_last: bool):
    """Logits ``(B, C)`` and labels ``(B,)`` of one batch: images (normalised on the device), or cached
    backbone features ``batch["features"]: (B, F) float32`` (``trainer.train.feature_cache``, head only)."""
    if "features" in batch:
        feats = batch["features"].to(device, non_blocking=True)
        return model(feats, features=True), batch["label"].to(device, non_blocking=True)
    images, labels = to_device(batch, device, channels_last=channels_last)
    return model(normalize(images, mean, std)), labels


def train_step(model: torch.nn.Module, micro_batches: Iterable[dict], *, optimizer, criterion, accelerator,
               grad_accum_steps: int, mean, std, channels_last: bool, grad_clip: float | None) -> torch.Tensor:
    """One optimizer step: forward/backward over ``grad_accum_steps`` micro-batches, then ``optimizer.step()``.

    Gradients are only all-reduced on the last micro-batch (``no_sync`` on the others), as in
    PyTorch's DDP gradient-accumulation recipe.

    Args:
        model: the (possibly DDP-wrapped) classifier, in train mode.
        micro_batches: iterator yielding at least ``grad_accum_steps`` batches (see :func:`to_device`),
            or feature batches ``{"features": (B, F) float32, "label": (B,) int64}`` from
            ``trainer.train.feature_cache`` (then only the head runs).
        optimizer: an Accelerate-prepared optimizer (handles the fp16 grad scaler).
        criterion: loss(logits (B, C), labels (B,)) -> scalar mean over the micro-batch.
        mean, std: per-channel normalization of the backbone (3 floats each).

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
                logits, labels = _forward(model, batch, device, mean=mean, std=std, channels_last=channels_last)
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
def evaluate(model: torch.nn.Module, batches: Iterator[dict], *, num_classes: int, accelerator, mean, std,
             channels_last: bool, on_batch=None) -> EvalResult:
    """Evaluate on this rank's share of the validation data and reduce over ranks.

    Every rank must call this (it ends in one ``all_reduce``), also a rank that received no batch.

    Args:
        model: the plain (unwrapped) classifier; put in eval mode here.
        batches: this rank's validation batches (each sample on exactly one rank).
        on_batch: optional callback ``(batch, logits (B, C) float32 on CPU) -> None`` (predictions CSV).

    Returns:
        EvalResult over all ranks (equal to a single-process evaluation).
    """
    was_training = model.training
    model.eval()
    acc = EvalAccumulator(num_classes, accelerator.device)
    for batch in batches:
        with accelerator.autocast():
            logits, labels = _forward(model, batch, accelerator.device, mean=mean, std=std,
                                      channels_last=channels_last)
            logits = logits.float()
        acc.update(logits, labels)
        if on_batch is not None:
            on_batch(batch, logits.cpu())
    model.train(was_training)
    return acc.reduce(accelerator)


