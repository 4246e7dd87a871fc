"""Reading a weights file into a state dict, and loading it strictly with an error that lists every mismatch."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def load_state_dict_file(path: str, what: str) -> dict:
    """Read a ``.safetensors`` (safetensors) or other (``torch.load(weights_only=True)``) weights file on CPU.

    A checkpoint-like dict without tensors at its top level is unwrapped at ``state_dict`` / ``model`` /
    ``model_state_dict``.

    Args:
        path: the file.
        what: what the file is for (``"model.weights"``), the start of every error message.

    Raises:
        RuntimeError: unreadable (truncated, corrupt, wrong format) or not a state dict; names ``path``.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / wrong format
        raise RuntimeError(f"{what}: could not read weights file {path}: {type(e).__name__}: {e}. "
                           f"If it is a truncated download, delete it and fetch it again.") from e
    if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping):
        raise RuntimeError(f"{what}: {path} does not hold a state dict (got {type(sd).__name__})")
    return dict(sd)


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, skip_prefixes=()) -> None:
    """Strictly load ``sd`` into ``module``; error lists missing/unexpected keys and shape mismatches."""
    sd = {k: v for k, v in sd.items() if not any(k == p or k.startswith(p + ".") for p in skip_prefixes)}
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or mismatched:
        def _fmt(xs):
            return ", ".join(xs[:20]) + (f", ... ({len(xs)} in all)" if len(xs) > 20 else "") if xs else "none"
        raise RuntimeError(
            f"weights {source} do not match the backbone: missing keys [{_fmt(missing)}]; "
            f"unexpected keys [{_fmt(unexpected)}]; shape mismatches [{_fmt(mismatched)}]")
    module.load_state_dict(sd, strict=True)
