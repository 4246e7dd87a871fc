"""Process setup for one process, DDP over GPUs, or DDP over CPU processes (gloo).

The one trap this module exists for: on a machine without a GPU, a process started by
``accelerate launch --multi_gpu --num_processes N`` or ``torchrun`` only joins a process group if the
``Accelerator`` is built with ``cpu=True``; otherwise every process silently trains its own copy.
:func:`make_accelerator` therefore passes ``cpu=True`` whenever CUDA is absent and then checks that the
world size seen inside equals the one the launcher announced (``WORLD_SIZE``).

The model is NOT wrapped by ``accelerator.prepare``: the training loop wraps it with
:func:`wrap_ddp` itself and re-wraps it after every unfreeze, because DDP records which parameters
need gradients when it is built (a later ``requires_grad`` change would otherwise leave ranks with
different gradients and no error).
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


class DistributedSetupError(RuntimeError):
    """The process group does not match what the launcher asked for."""


def launched_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE`` from torchrun / accelerate launch), 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(mixed_precision: str = "no", *, timeout_s: int = 600) -> Accelerator:
    """Build the Accelerator for this process.

    Args:
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (``train.mixed_precision``).
        timeout_s: timeout of collective operations, seconds.

    Returns:
        An ``accelerate.Accelerator`` (gloo on CPU, NCCL on GPU).

    Raises:
        DistributedSetupError: the world size inside differs from ``WORLD_SIZE`` (the run would
            silently train independent copies), or fp16 is asked for without a GPU.
    """
    use_cpu = not torch.cuda.is_available()
    if use_cpu and mixed_precision == "fp16":
        raise DistributedSetupError(
            "train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )
    expected = launched_world_size()
    if accelerator.num_processes != expected:
        raise DistributedSetupError(
            f"launcher asked for world_size={expected} (WORLD_SIZE) but this process sees "
            f"world_size={accelerator.num_processes}: the run would train independent copies. "
            "On CPU launch with `accelerate launch --multi_gpu --num_processes N` or torchrun.")
    return accelerator


def wrap_ddp(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when more than one process runs, else return it.

    Call again after every change of ``requires_grad`` (see module docstring): DDP registers the
    trainable parameters at construction and broadcasts rank 0's parameters and buffers, so all ranks
    start the new phase identical; buffers (BN statistics) are broadcast from rank 0 at each forward so
    they stay identical too. ``find_unused_parameters`` stays off: every trainable parameter is
    used in each forward pass.
    """
    if accelerator.num_processes == 1:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedSetupError("no trainable parameter: nothing for DDP to synchronise")
    device_ids = [accelerator.local_process_index] if accelerator.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # newer torch renamed broadcast_buffers to forward_sync_buffers (same meaning when True)
    sync = ({"forward_sync_buffers": True} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": True})
    return ddp(model, device_ids=device_ids, gradient_as_bucket_view=True, **sync)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP (or torch.compile) wrapper."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
