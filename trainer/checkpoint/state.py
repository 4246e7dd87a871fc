"""Checkpoints: the resume checkpoint's content, atomic writes, safe loading.

Files in ``<output_dir>/checkpoints/``:

* ``last.pt`` (and with ``train.keep_checkpoints`` > 1 the step files ``step_<step>.pt``, kept and chosen by
  :mod:`trainer.checkpoint.files`) - everything needed to continue: model, optimizer state matched by parameter *name*,
  grad scaler, RNG states of every rank, epoch / step / samples_seen, class map, W&B run id,
  early-stopping state and the resolved config. Built by :func:`resume_state`, read back by
  :func:`restore_resume_state` (the only two places that know its keys).
  RNG states are tensors and plain numbers.
* ``best/`` - the inference checkpoint (``model.safetensors`` + ``model.json``), written and read by
  :mod:`trainer.checkpoint.inference`.

Loading is always :func:`trainer.models.state_dict.safe_torch_load` (``torch.load(weights_only=True)``, the
only call of ``torch.load`` in the trainer): a file holds tensors and plain data (dict, list, tuple, str,
numbers, None) only, so a crafted checkpoint cannot run code when it is read; anything else is refused with
:class:`CheckpointError` (one line, naming the file and the refused object). ``CheckpointError``,
``CorruptCheckpointError`` and ``safe_torch_load`` live in :mod:`trainer.models.state_dict` and are
re-exported here.

Every write goes through :func:`trainer.files.atomic.atomic_write` (temp file, fsync, rename), so a
crash or ``kill -9`` in the middle of a write leaves the previous checkpoint intact and never a
half-written file under the real name.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config.schema import ConfigError
from trainer.models.state_dict import (  # noqa: F401 (re-exported)
    CheckpointError,
    CorruptCheckpointError,
    safe_torch_load,
)
from trainer.files.atomic import atomic_write

log = logging.getLogger("trainer")

FORMAT_VERSION = 2
"""``last.pt`` layout version. 2: RNG states stored as tensors / plain numbers (loadable with
``weights_only=True``). A version-1 ``best.pt`` (plain data) still loads for inference."""
READABLE_VERSIONS = (1, 2)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` via :func:`trainer.files.atomic.atomic_write` (never a partial file)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


def load(path: str | Path) -> dict:
    """Load a checkpoint dict of this trainer on CPU, safely (:func:`safe_torch_load`).

    Raises:
        CheckpointError: missing, refused (code payload), truncated or not a checkpoint of this
            project (one line naming the file).
    """
    path = Path(path)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(not_a_checkpoint(path, ckpt))
    return ckpt


def not_a_checkpoint(path: Path, obj: Any) -> str:
    """One line for a readable file that is not a checkpoint of this trainer: what it holds and what to do."""
    version = obj.get("format_version") if isinstance(obj, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        return (f"{path} was written by a newer trainer version (format_version {version}; this one reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}): update the trainer to read it")
    weights = isinstance(obj, dict) and ("state_dict" in obj or "model" in obj
                                         or bool(obj) and all(torch.is_tensor(v) for v in obj.values()))
    if weights:
        keys = ", ".join(sorted(map(str, obj))[:4]) + (", ..." if len(obj) > 4 else "")
        return (f"{path} holds plain weights ({keys}), not a checkpoint of this trainer: it names no backbone or "
                "preprocessing to rebuild the model from; write it as an inference checkpoint folder with "
                "trainer.checkpoint.inference.save(folder, state_dict, class_names=..., backbone=..., "
                "preprocessing=..., ...) and pass that folder")
    return (f"{path} is not a checkpoint of this trainer (a dict with format_version "
            f"{' or '.join(map(str, READABLE_VERSIONS))} expected, found {type(obj).__name__}): pass a run's "
            "checkpoints/best folder or a last.pt / best.pt this trainer wrote")


# ---------------------------------------------------------------------------------------------
# last.pt: the resume state


@dataclass
class Progress:
    """Counters of a run, saved in ``last.pt``.

    Attributes:
        step: optimizer steps done. epoch: epochs completed. samples_seen: step x global_batch_size.
        best_top1: val top-1 of the model in ``checkpoints/best/`` (-1 before the first evaluation).
        eval_step: the step of the newest validation this state includes (early stopping, ``best/``, its
            ``metrics.jsonl`` row; -1: none). A checkpoint with ``eval_step < step`` was written before the
            validation at ``step`` (an epoch end's preemption): a resumed run runs that validation (again).
    """

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    best_top1: float = -1.0
    eval_step: int = -1


def resume_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, param_names: dict[int, str],
                 scaler, rng: list[dict], progress: Progress, class_names: list[str], backbone: str,
                 preprocessing: dict, config: dict, early_stopping: dict, wandb_run_id: str | None,
                 reason: str, ema=None, resumed_from: str | None = None) -> dict:
    """The dict stored as ``last.pt`` (read back by :func:`restore_resume_state`).

    Args:
        model: the plain (unwrapped) model. optimizer: the torch optimizer (not Accelerate's wrapper).
        param_names: ``id(param) -> name`` (optimizer state is stored by name).
        scaler: the fp16 grad scaler or None. rng: :func:`rng_state` of every rank, in rank order.
        reason: why it was written (``"epoch"``, ``"interval"``, ``"preempted (signal 15)"``), for people.
        ema: the run's :class:`trainer.train.ema.ModelEma` or None (stored under ``"ema"``).
        resumed_from: the checkpoint name this run went back to with ``train.resume_from`` (or None), kept
            in every later checkpoint of the run (:func:`trainer.checkpoint.run_folder.plan_start` reads it).
    """
    return {
        "format_version": FORMAT_VERSION, "kind": "resume",
        "model": model.state_dict(),
        "optimizer": optimizer_state_by_name(optimizer, param_names),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng, "step": progress.step, "epoch": progress.epoch, "samples_seen": progress.samples_seen,
        "best_top1": progress.best_top1, "eval_step": progress.eval_step,
        "class_names": list(class_names), "backbone": backbone,
        "preprocessing": preprocessing, "config": config, "early_stopping": early_stopping,
        "wandb_run_id": wandb_run_id, "world_size": len(rng), "reason": reason,
        "ema": ema.state_dict() if ema is not None else None, "resumed_from": resumed_from,
    }


def restore_resume_state(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         param_names: dict[int, str], scaler, early_stopping, class_names: list[str],
                         backbone: str, global_batch_size: int, rank: int,
                         world_size: int, ema=None) -> tuple[Progress, str | None]:
    """Load ``last.pt`` into the run's objects: weights, optimizer (by name), scaler, early stopping
    (``early_stopping.load_state_dict``), this rank's RNG states, and the EMA weights into ``ema`` (a
    :class:`trainer.train.ema.ModelEma`; a checkpoint without EMA starts it from the weights).

    Returns:
        (the run's :class:`Progress`, the W&B run id or None).

    Raises:
        CheckpointError: unreadable file or optimizer state that does not fit (names the file).
        ConfigError: the checkpoint's classes, backbone or global_batch_size differ from this run.
    """
    state = load(path)
    if state["class_names"] != class_names:
        raise ConfigError(
            f"checkpoint {path} was trained on {len(state['class_names'])} classes "
            f"{state['class_names'][:5]}... but the data has {len(class_names)} classes "
            f"{class_names[:5]}... (data.shard_dir / train.output_dir)")
    if state["backbone"] != backbone:
        raise ConfigError(f"checkpoint {path} has backbone {state['backbone']}, config "
                          f"model.backbone is {backbone}")
    saved_gbs = (state.get("config") or {}).get("train", {}).get("global_batch_size")
    if saved_gbs is not None and saved_gbs != global_batch_size:
        raise ConfigError(
            f"checkpoint {path} was trained with train.global_batch_size={saved_gbs}, this run has "
            f"{global_batch_size}: steps, epochs and the lr schedule would not line up "
            "(keep train.global_batch_size; a different world size is fine)")
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state.get("ema") or state["model"])
    load_optimizer_state_by_name(optimizer, state["optimizer"], param_names, source=str(path))
    if state.get("scaler") is not None and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if state.get("early_stopping"):
        early_stopping.load_state_dict(state["early_stopping"])
    rng = state.get("rng") or []
    if len(rng) == world_size:
        set_rng_state(rng[rank])
    else:  # another world size: per-rank RNG streams do not map; seeds stay as set by the caller
        log.warning("resuming on %d processes from a checkpoint of %d: per-rank RNG states not restored, "
                    "data order and augmentation differ from an uninterrupted run", world_size, len(rng))
    progress = Progress(step=state["step"], epoch=state["epoch"], samples_seen=state["samples_seen"],
                        best_top1=state["best_top1"], eval_step=state.get("eval_step", state["step"]))
    log.info("resumed from %s at epoch %d step %d (samples_seen %d)", path, progress.epoch, progress.step,
             progress.samples_seen)
    return progress, state.get("wandb_run_id")


# ---------------------------------------------------------------------------------------------
# optimizer state by parameter name


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """Optimizer state keyed by parameter name, plus each group's hyper-parameters keyed by group name.

    Args:
        names: ``id(param) -> parameter name``.
    """
    state = {names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}
    return {"state": state, "groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict, names: dict[int, str],
                                 source: str = "checkpoint") -> None:
    """Restore :func:`optimizer_state_by_name` output into ``optimizer`` (built the same way).

    Each parameter's state (e.g. AdamW's ``exp_avg``) is matched by name, each group's
    hyper-parameters by group name, so a different group order cannot misplace state.

    Raises:
        CheckpointError: a group or parameter of the checkpoint is missing in this optimizer (or the
            reverse for groups), naming it.
    """
    by_name = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            by_name[names[id(p)]] = p
    missing_groups = set(saved["groups"]) ^ {g["name"] for g in optimizer.param_groups}
    if missing_groups:
        raise CheckpointError(f"{source}: optimizer groups differ from this run's: {sorted(missing_groups)}")
    for g in optimizer.param_groups:
        for k, v in saved["groups"][g["name"]].items():
            g[k] = v
    for name, s in saved["state"].items():
        if name not in by_name:
            raise CheckpointError(f"{source}: optimizer state for unknown parameter '{name}'")
        p = by_name[name]
        optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                              for k, v in s.items()}


# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as tensors and plain numbers.

    Plain data so that ``last.pt`` loads with ``weights_only=True``: Python's Mersenne Twister
    state (625 words) and NumPy's (624 uint32 keys) become int64 tensors.
    """
    py_version, py_words, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(py_version), "state": torch.tensor(py_words, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
