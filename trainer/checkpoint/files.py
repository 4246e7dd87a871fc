"""Which resume checkpoints a run folder keeps: their names, the newest complete one, pruning, rewinding.

``train.keep_checkpoints = 1`` (default): one resume checkpoint, ``checkpoints/last.pt``, replaced at every
write. ``k >= 2``: every write is ``checkpoints/step_<step, 9 digits>.pt`` and ``last.pt`` is then
re-pointed to it as a hard link (no second copy; a copy where the file system has no hard links); the
step files beyond the k newest are deleted only after the new one is complete, so the folder holds the
k newest resume checkpoints + ``last.pt`` (the newest of them) + ``best/``.

Each write is atomic (:func:`trainer.files.atomic.atomic_write`: temp file, fsync, rename). A kill at any
moment leaves every complete checkpoint readable and at worst a temp file, which the next start deletes
(:func:`trainer.checkpoint.run_folder.clean_start`); :func:`latest_checkpoint` then picks the newest complete one
(a step file written just before the kill, ahead of ``last.pt``, included).

A checkpoint damaged otherwise (truncated by a full disk, a bad copy) never blocks a start: :func:`newest_intact`
skips it for the newest one that loads, and :func:`set_aside` moves it to ``checkpoints/corrupt/`` (never deleted).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from trainer.models.state_dict import CorruptCheckpointError, safe_torch_load
from trainer.checkpoint.state import atomic_save, checkpoint_dir, load
from trainer.files.atomic import atomic_link, fsync_dir

log = logging.getLogger("trainer")

LAST = "last.pt"
CORRUPT = "corrupt"
"""Folder in ``checkpoints/`` where unreadable checkpoints are moved (:func:`set_aside`)."""
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def step_checkpoint(output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/checkpoints/step_<step>.pt`` (zero-padded to 9 digits, so names sort by step)."""
    return checkpoint_dir(output_dir) / f"step_{step:09d}.pt"


def step_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The step files of a run folder as ``(step, path)``, oldest first (temp files never match)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_file()]
    return sorted(found)


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step stored in a resume checkpoint (its name for a step file; else read memory-mapped,
    without reading the tensors).

    Raises:
        trainer.checkpoint.state.CheckpointError: unreadable file (names it).
    """
    m = _STEP_RE.match(Path(path).name)
    if m:
        return int(m.group(1))
    return int(safe_torch_load(path, mmap=True)["step"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete resume checkpoint of a run folder: ``last.pt`` or a step file, whichever holds the
    higher step (``last.pt`` on a tie); None if there is none."""
    last = checkpoint_dir(output_dir) / LAST
    steps = step_checkpoints(output_dir)
    if not steps:
        return last if last.is_file() else None
    step, newest = steps[-1]
    if not last.is_file():
        return newest
    if os.path.samefile(last, newest):
        return last
    return last if checkpoint_step(last) >= step else newest


def newest_intact(output_dir: str | Path) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest resume checkpoint of a run folder that loads, skipping unreadable ones; only reads.

    Candidates in the order of :func:`latest_checkpoint` (a step file newer than ``last.pt``, ``last.pt``, then
    the older step files). A file whose loading raises :class:`trainer.checkpoint.state.CorruptCheckpointError`
    (truncated, damaged) is skipped; ``last.pt``'s hard-linked step file with it.

    Returns:
        (path, its loaded state) of the newest intact checkpoint or ``(None, None)``, and the skipped files as
        ``(path, reason)``, newest first.

    Raises:
        trainer.checkpoint.state.CheckpointError: a checkpoint that loads but is refused (code payload) or not
            one of this trainer: not damaged, so not skipped.
    """
    last = checkpoint_dir(output_dir) / LAST
    corrupt: list[tuple[Path, str]] = []
    last_state = None
    if last.is_file():
        try:
            last_state = load(last)
        except CorruptCheckpointError as e:
            corrupt.append((last, str(e)))
    for step, path in reversed(step_checkpoints(output_dir)):
        if last_state is not None and step <= last_state["step"]:
            break  # last.pt is as new (on a tie, it is this file's link)
        if corrupt and corrupt[0][0] == last and os.path.samefile(path, last):
            corrupt.append((path, corrupt[0][1]))
            continue
        try:
            return path, load(path), corrupt
        except CorruptCheckpointError as e:
            corrupt.append((path, str(e)))
    return (last, last_state, corrupt) if last_state is not None else (None, None, corrupt)


def set_aside(paths: list[Path]) -> list[Path]:
    """Move unreadable checkpoints to ``checkpoints/corrupt/<name>`` (``<name>.1``, ... if taken), never deleting
    one. Main process only.

    Returns:
        their new paths.
    """
    moved = []
    for path in paths:
        folder = path.parent / CORRUPT
        folder.mkdir(exist_ok=True)
        dest, n = folder / path.name, 0
        while dest.exists():
            n += 1
            dest = folder / f"{path.name}.{n}"
        os.replace(path, dest)
        moved.append(dest)
    if moved:
        fsync_dir(moved[0].parent)
        fsync_dir(paths[0].parent)
    return moved


def save_resume(state: dict, output_dir: str | Path, step: int, keep: int) -> Path:
    """Write resume checkpoint ``state`` (of optimizer step ``step``) as ``keep`` says (module docstring), then
    delete the step files beyond the ``keep`` newest (all of them when ``keep`` is 1). Main process only.

    Returns:
        the file written (``last.pt`` or the step file).
    """
    last = checkpoint_dir(output_dir) / LAST
    if keep <= 1:
        atomic_save(state, last)
        written = last
    else:
        written = step_checkpoint(output_dir, step)
        atomic_save(state, written)
        atomic_link(written, last)
    steps = step_checkpoints(output_dir)
    for _, old in steps[:max(len(steps) - keep, 0)] if keep > 1 else steps:
        old.unlink(missing_ok=True)
    return written


def rewind(output_dir: str | Path, resumed: Path) -> list[Path]:
    """After resuming from an older checkpoint ``resumed`` (``train.resume_from``): delete the step files
    newer than it (a future this run no longer has; pruning would otherwise keep them over the new ones) and
    point ``last.pt`` at it. Main process only.

    Returns:
        the deleted step files.
    """
    step = checkpoint_step(resumed)
    gone = [p for s, p in step_checkpoints(output_dir) if s > step]
    for p in gone:
        p.unlink(missing_ok=True)
    last = checkpoint_dir(output_dir) / LAST
    if Path(resumed).resolve() != last.resolve() and not (last.is_file() and os.path.samefile(last, resumed)):
        atomic_link(Path(resumed), last)
    if gone:
        log.info("train.resume_from %s: deleted the %d newer step checkpoint(s) %s", Path(resumed).name, len(gone),
                 ", ".join(p.name for p in gone))
    return gone
