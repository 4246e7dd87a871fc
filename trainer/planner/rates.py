"""Measured speed and memory of backbone x input size on this machine, kept in a per-machine cache.

:func:`rates_for` returns one :class:`Rate` per input size: fine-tuning images/s (forward + backward + AdamW,
train mode), inference images/s and peak training memory at the measured micro-batch, from
:func:`trainer.selection.measure.measure_cost` (synthetic images, the run's precision and memory format: the
model alone, no data loading). Measurements are kept in ``$FINETUNE_CACHE_DIR/rates.json`` (default
``$XDG_CACHE_HOME/finetune``, else ``~/.cache/finetune``) under a key naming the machine (CPU model or GPU
name, torch version, threads), so a second run on the same machine measures nothing. A measurement takes a
few seconds per size on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from trainer.files.atomic import atomic_write

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class Rate:
    """The model alone at one input size: ``train_img_s`` / ``infer_img_s`` (images/s on one process) and
    ``peak_mem_mib`` (training, at ``batch`` images per micro-batch)."""

    size: int
    train_img_s: float
    infer_img_s: float
    peak_mem_mib: float
    batch: int


def cache_path() -> Path:
    """The per-machine cache file (see the module docstring)."""
    root = os.environ.get("FINETUNE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME")
                                                        or Path.home() / ".cache") / "finetune"
    return Path(root) / "rates.json"


def machine_key(device: torch.device) -> str:
    """What the rates depend on besides the model: the processor (or GPU), torch version, torch threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{name} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measured again and rewritten


def rates_for(backbone: str, sizes: list[int], *, device: torch.device, precision: str, batch: int,
              channels_last: bool = True, num_classes: int = 10) -> dict[int, Rate]:
    """:class:`Rate` of ``backbone`` at each of ``sizes`` on ``device``, from the cache or measured now.

    Args:
        backbone: ``model.backbone``. sizes: square input sides (pixels). precision: ``no`` / ``bf16`` / ``fp16``.
        batch: micro-batch the rates are measured at (the run's, capped at 32).
        channels_last, num_classes: as the run (the head size hardly changes the rates).

    Raises:
        anything :func:`trainer.models.build.build_model` raises for an unknown backbone.
    """
    from trainer.selection.measure import measure_cost

    path = cache_path()
    cache = _read(path)
    machine = cache.setdefault(machine_key(device), {})
    out, dirty = {}, False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = partial(torch.autocast, device.type, dtype=dtype) if dtype else nullcontext
    for size in sizes:
        key = f"{backbone} | {size}px | {precision} | batch {batch} | channels_last {channels_last}"
        if key not in machine:
            c = measure_cost(backbone, "none", num_classes=num_classes, batch_size=batch, device=device,
                             autocast=autocast, channels_last=channels_last, steps=3, input_size=size)
            machine[key] = asdict(Rate(size, c.train_img_s, c.infer_img_s, c.peak_train_mem_mib, batch))
            log.info("planner: measured %s: fine-tuning %.1f images/s, inference %.1f images/s, peak %.0f MiB",
                     key, c.train_img_s, c.infer_img_s, c.peak_train_mem_mib)
            dirty = True
        out[size] = Rate(**machine[key])
    if dirty:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(cache, indent=1, sort_keys=True))
        except OSError as e:  # a read-only home: measured again next time
            log.warning("planner: cannot keep the measured rates in %s: %s", path, e)
    return out
