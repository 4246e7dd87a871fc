"""One writer per shard folder; a reader sees a complete dataset or none, and never a missing folder.

Lock. Every write, reuse decision and commit of ``<parent>/<name>`` happens holding the lock file
``<parent>/.<name>.lock`` (:func:`shard_lock`, :mod:`trainer.files.lock`: host, pid, start time,
heartbeat; a stale lock of a dead process is taken over with a warning, a waiter logs who holds it). So
two runs started together on one empty ``data.shard_dir`` do not both write: the second waits, then
finds the first one's ``dataset.json`` and reuses it (or refuses in one line if its source differs).
In a DDP run only the main process takes it and writes; the other ranks wait for it
(:func:`trainer.distributed.wait.main_first`). N independent writers (below) hold it only to start and to
merge and commit, not while they write. A read-only parent folder holding a complete dataset is read
without a lock (none can be made, and nothing will be written).

Staging. Writers fill ``<parent>/.<name>.staging-<host>-<pid>`` (one process and its pool) or
``<parent>/.<name>.staging-of-<N>`` (N independent writers, e.g. a Slurm array; shared by them). The
commit (:func:`commit`) is, by what ``<name>`` holds:

* nothing, or an empty folder: the staging folder is renamed to ``<name>`` (one atomic rename; before
  it there is no dataset to read);
* no ``dataset.json`` but shard-writer files (``*.tar``, ``dataset*.json``, hidden temp files, ``v<N>/``):
  the remains of an interrupted write by an older version, which no reader can have opened: they are
  deleted, then the staging folder is renamed over the (now empty) folder, which never disappears;
* a dataset (``overwrite``): readers may be using it, so ``<name>`` stays and nothing in it changes
  name: the staging folder is renamed *into* it as the next version folder ``<name>/v<N>/`` (N = 2, 3,
  ...), and then ``dataset.json`` is replaced atomically by one listing ``v<N>/<shard>`` names. That
  replace is the commit point: a reader reads either the old ``dataset.json`` or the new one, and the
  shards each lists are complete files that are not renamed or rewritten. Files of the version before
  the replaced one are deleted then; the replaced version is kept until the next overwrite, so a run
  that opened it keeps a consistent view of it while the new version is committed (the cost: two
  versions on disk until then).

A kill at any moment therefore leaves the old state or the new one; :func:`recover` (called holding the
lock before every write and every reuse) restores an old folder left aside by an older version's
interrupted swap (``.<name>.old-<host>-<pid>``) and deletes staging folders of dead processes on this
host. Nothing outside ``<parent>/.<name>.*`` and the shard-writer files in ``<name>`` is ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from trainer.data.listing import DataError
from trainer.data.meta import META_NAME, load_json, write_meta
from trainer.files import lock as file_lock
from trainer.files.atomic import fsync_dir, pid_alive  # the same liveness test and folder flush as atomic_write

log = logging.getLogger(__name__)

_OURS = re.compile(r"^(\.|dataset.*\.json$|[\w-]+\.tar$)")
_VERSION = re.compile(r"^v(\d+)$")


def _host() -> str:
    return file_lock.host_name()


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of the shard folder ``out``: ``<parent>/.<name>.lock``."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def shard_lock(out: str | os.PathLike, what: str = "writing shards", **kw) -> Iterator[file_lock.HostLock | None]:
    """Hold ``out``'s lock for the ``with`` block (re-entrant; ``kw``: :class:`trainer.files.lock.HostLock`).

    A read-only parent folder (no lock file can be made) that holds a complete dataset yields None: such
    shards can only be read, which needs no lock.

    Raises:
        TimeoutError: only with ``timeout_s``, while a live holder keeps it.
        PermissionError / OSError: the lock file cannot be made and ``out`` holds no dataset.
    """
    out = Path(out)
    with contextlib.ExitStack() as stack:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(file_lock.locked(lock_path(out), what=f"{what} into {out}", **kw))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not (out / META_NAME).is_file():
                raise
            log.info("%s: cannot make the lock file (%s); reading the shards without it", out, e.strerror)
            lock = None
        yield lock


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
    """Undo what a killed writer left: restore an interrupted swap, delete dead writers' staging folders.
    Takes ``out``'s lock (waits for a live writer)."""
    out = Path(out)
    with shard_lock(out):
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


def _is_ours(p: Path) -> bool:
    return bool(_VERSION.match(p.name)) if p.is_dir() else bool(_OURS.match(p.name))


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
    foreign = [p for p in out.iterdir() if not _is_ours(p)]
    if foreign:
        raise DataError(f"data.shard_dir: {out} holds no {META_NAME} but other files (e.g. {foreign[0].name}); "
                        "point data.shard_dir at a new or empty folder")


def _top_names(meta: dict) -> set[str]:
    """First path components of the relative shard names in a ``dataset.json`` dict."""
    return {s.replace("\\", "/").split("/", 1)[0] for m in meta.get("splits", {}).values()
            for s in m.get("shards", []) if not os.path.isabs(s) and "://" not in s and not s.startswith("pipe:")}


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def commit(staging: Path, out: Path) -> dict:
    """Make the finished ``staging`` folder the dataset in ``out`` (how: module docstring), holding the lock.

    Returns:
        the committed ``dataset.json`` dict (shard names prefixed ``v<N>/`` when a dataset was replaced).

    Raises:
        FileNotFoundError: ``staging`` is gone (another writer committed it first).
        trainer.files.lock.LockLost: another process took this writer's lock over; nothing changed.
    """
    if not staging.is_dir():
        raise FileNotFoundError(f"staging folder {staging} is gone (committed by another writer)")
    lock = file_lock.held(lock_path(out))
    if lock is not None:
        lock.verify()
    meta = load_json(staging / META_NAME)
    if out.is_dir() and (out / META_NAME).is_file():
        old = load_json(out / META_NAME)
        n = max([int(m.group(1)) for p in out.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()] + [1]) + 1
        version = f"v{n}"
        staging.rename(out / version)
        for split in meta["splits"].values():
            split["shards"] = [f"{version}/{s}" for s in split["shards"]]
        write_meta(out / META_NAME, meta)  # the commit point
        keep = {META_NAME, version} | _top_names(old)
        for p in out.iterdir():
            if p.name not in keep and _is_ours(p):
                _remove(p)
        log.info("replaced the dataset in %s by version %s (the previous one stays until the next overwrite)",
                 out, version)
    else:
        if out.is_dir():  # leftovers of an interrupted older write (check_target allowed only ours): no reader
            for p in out.iterdir():
                if _is_ours(p):
                    _remove(p)
        staging.rename(out)  # onto a missing or empty folder: atomic
    fsync_dir(out.parent)
    return meta
