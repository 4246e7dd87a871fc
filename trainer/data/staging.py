"""A shard folder appears complete or not at all: write into a staging folder, rename it into place.

Writers fill ``<parent>/.<name>.staging-<host>-<pid>`` (one process and its pool) or
``<parent>/.<name>.staging-of-<N>`` (N independent writers, e.g. a Slurm array; shared by them), and
:func:`commit` renames the finished folder to ``<parent>/<name>``. An existing complete folder is first
renamed aside (``.<name>.old-<host>-<pid>``) and deleted after the swap. A kill at any moment therefore
leaves the old state or the new one; :func:`recover` (called before every write and every reuse)
restores an old folder whose swap was interrupted and deletes staging folders of dead processes on
this host. Nothing outside ``<parent>/.<name>.*`` is ever deleted, except a folder at ``<name>``
that holds only shard-writer files (``*.tar``, ``dataset*.json``, hidden temp files) and no
``dataset.json``: the remains of an interrupted write by an older version.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path

from trainer.data.listing import DataError
from trainer.data.meta import META_NAME
from trainer.utils.files import fsync_dir, pid_alive  # the same liveness test and folder flush as atomic_write

log = logging.getLogger(__name__)

_OURS = re.compile(r"^(\.|dataset.*\.json$|[\w-]+\.tar$)")


def _host() -> str:
    return re.sub(r"[^\w-]", "_", socket.gethostname())


def staging_dir(out: Path, num_writers: int | None = None) -> Path:
    """Staging folder for ``out``: per process, or shared by ``num_writers`` independent writers."""
    tag = f"of-{num_writers}" if num_writers else f"{_host()}-{os.getpid()}"
    return out.parent / f".{out.name}.staging-{tag}"


def _siblings(out: Path, kind: str) -> list[tuple[Path, str, int]]:
    """``(path, host, pid)`` of ``.<name>.<kind>-<host>-<pid>`` folders beside ``out``."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.{kind}-(.+)-(\d+)$")
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if m:
            found.append((p, m.group(1), int(m.group(2))))
    return found


def recover(out: str | os.PathLike) -> None:
    """Undo what a killed writer left: restore an interrupted swap, delete dead writers' staging folders."""
    out = Path(out)
    host = _host()
    olds = _siblings(out, "old")
    if not out.exists() and olds:
        newest = max(olds, key=lambda t: t[0].stat().st_mtime)[0]
        newest.rename(out)
        log.warning("restored %s from %s (a swap of shard folders was interrupted)", out, newest.name)
        olds = [t for t in olds if t[0] != newest]
    for p, _, _ in olds:  # the swap finished (out exists): the old folder is garbage
        shutil.rmtree(p, ignore_errors=True)
    for p, h, pid in _siblings(out, "staging"):
        if h == host and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s (left by an interrupted shard write)", p)


def check_target(out: Path, overwrite: bool) -> None:
    """Fail before any writing if ``out`` cannot be replaced.

    Raises:
        FileExistsError: ``out`` holds a complete dataset and not ``overwrite``.
        DataError: ``out`` holds files that are not the shard writer's (names the folder and a file).
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"data.shard_dir: {out} exists and is not a folder")
    if (out / META_NAME).is_file():
        if not overwrite:
            raise FileExistsError(f"write_shards: {out} already holds a dataset ({META_NAME}); pass "
                                  "overwrite=True (--overwrite) to replace it")
        return
    foreign = [p for p in out.iterdir() if p.is_dir() or not _OURS.match(p.name)]
    if foreign:
        raise DataError(f"data.shard_dir: {out} holds no {META_NAME} but other files (e.g. {foreign[0].name}); "
                        "point data.shard_dir at a new or empty folder")


def commit(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out`` (replacing what :func:`check_target` allowed).

    Raises:
        FileNotFoundError: ``staging`` is gone (another writer committed it first).
    """
    if not staging.is_dir():
        raise FileNotFoundError(f"staging folder {staging} is gone (committed by another writer)")
    if out.exists():
        old = out.parent / f".{out.name}.old-{_host()}-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    fsync_dir(out.parent)
