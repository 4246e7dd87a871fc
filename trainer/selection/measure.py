"""Cost of a backbone on this machine: images/s (training, inference), parameters, GFLOPs, peak memory.

* **Training images/s**: full fine-tuning steps (every parameter trains; forward + cross-entropy +
  backward + AdamW step) on random inputs of ``batch_size`` images at the backbone's input size, in
  the run's precision (autocast) and memory format; 1 warm-up step, then the mean over ``steps``
  timed steps (wall clock, ``torch.cuda.synchronize`` on GPU).
* **Inference images/s**: eval mode, no gradients, same batch size and precision.
* **GFLOPs per image**: ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of one image
  (FLOPs = 2 x multiply-accumulates of convolutions and matmuls; elementwise ops not counted).
* **Peak training memory** (MiB): GPU: ``torch.cuda.max_memory_allocated`` during model build + the
  training steps. CPU: the growth of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``, Linux >= 4.0) over its value before the model was built, after
  ``malloc_trim``; it covers weights, gradients, optimizer state and activations (NaN elsewhere).
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.models.build import build_model


@dataclass
class Cost:
    """Measured cost of one backbone (per process). Units in the field names."""

    params_m: float
    gflops: float
    train_img_s: float
    infer_img_s: float
    peak_train_mem_mib: float


def _rss_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def _reset_peak_rss() -> float:
    """Trim the heap, reset ``VmHWM`` to the current RSS; return the current RSS in KiB (NaN if unsupported)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    return _rss_kib("VmRSS")


def gflops_per_image(model: torch.nn.Module, input_size: int) -> float:
    """Forward GFLOPs of ``model`` (eval mode) for one ``(1, 3, S, S)`` input (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost(backbone: str, weights: str, *, num_classes: int, batch_size: int, device: torch.device,
                 autocast=None, channels_last: bool = True, steps: int = 3, input_size: int | None = None) -> Cost:
    """Build ``backbone`` afresh and measure it (see the module docstring).

    Args:
        backbone, weights: as ``model.backbone`` / ``model.weights``.
        num_classes: head size. batch_size: images per step (the run's ``micro_batch_size``).
        device: where to run. autocast: context-manager factory for the precision (None: float32).
        channels_last: the run's memory format. steps: timed steps per measurement (>= 1).
        input_size: square input side in pixels (None: the backbone's pretraining size).

    Raises:
        ValueError: ``steps < 1`` or ``batch_size < 1``; anything :func:`build_model` raises.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"measure_cost: need steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    autocast = autocast or nullcontext
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_rss()
    model, prep = build_model(backbone, num_classes, weights)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model = model.to(device, memory_format=fmt)
    size = input_size or prep.input_size
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def train_step():
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # warm-up: allocates optimizer state and gradients, picks kernels
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_s = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = (_rss_kib("VmHWM") - base) / 1024
    del opt
    model.eval()
    with torch.inference_mode():
        with autocast():
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with autocast():
                model(x)
        _sync(device)
        infer_s = time.perf_counter() - t0
    gflops = gflops_per_image(model.float().to("cpu").to(memory_format=torch.contiguous_format), size)
    del model, x, y
    return Cost(params_m, gflops, steps * batch_size / train_s, steps * batch_size / infer_s, peak)
