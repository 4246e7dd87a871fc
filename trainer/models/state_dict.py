"""Reading torch files safely, a weights file into a state dict, and loading it strictly with an error that
lists every mismatch.

:func:`safe_torch_load` is the one place the trainer calls ``torch.load`` (``tests/test_layout.py`` checks it):
always ``weights_only=True`` on CPU, so a file holds tensors and plain data (dict, list, tuple, str, numbers,
None) only and a crafted file cannot run code when it is read; anything else is refused with
:class:`CheckpointError` (one line, naming the file and the refused object). Resume checkpoints
(:mod:`trainer.checkpoint.state`), weights files and the feature caches all read through it.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not fit the run (message names the file and the mismatch)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read at all (truncated, damaged, not a torch file): a damaged file, not
    one refused for its content. A run folder sets such a file aside (:mod:`trainer.checkpoint.files`)."""


def _refusal(path: Path, err: Exception) -> str:
    """One line for a file the weights-only unpickler refused (names the object it would have built)."""
    text = str(err)
    m = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+|Unsupported operand \d+|"
                  r"Unsupported class \S+)", text, re.IGNORECASE)
    detail = m.group(1) if m else text.strip().splitlines()[-1] if text.strip() else type(err).__name__
    hint = (" (a last.pt of an older trainer version stores NumPy objects: start a fresh train.output_dir)"
            if "numpy" in detail else "")
    return (f"refused to load {path}: it holds Python objects beyond tensors and plain data, which could "
            f"run code when unpickled ({detail}); only checkpoints written by this trainer load{hint}")


def safe_torch_load(path: str | Path, mmap: bool = False):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors; ``mmap``: tensors are
    memory-mapped, not read (for reading a few plain values of a large file).

    Returns:
        the unpickled object: tensors (on CPU) inside dicts, lists, tuples and plain values.

    Raises:
        CheckpointError: missing file; a pickle that needs anything beyond tensors and plain data (its
            code never runs: the weights-only unpickler stops at the first such object);
            :class:`CorruptCheckpointError` for a truncated or otherwise unreadable file. The message is one
            line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # "pickle protocol 4" notices for files not written by torch.save
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(path, e)) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        first = " ".join(str(e).split())[:300]
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None


def load_state_dict_file(path: str, what: str) -> dict:
    """Read a ``.safetensors`` (safetensors) or other (:func:`safe_torch_load`) weights file on CPU.

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
            sd = safe_torch_load(path)
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
