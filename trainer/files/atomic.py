"""Atomic file writes, clean-up of dead writers' temp files, file checksums.

Every file the trainer writes for others to read (checkpoints, ``dataset.json``, metrics, plots,
predictions, exports) goes through :func:`atomic_write`: the content is written to
``.<name>.tmp-<pid>`` in the target's folder, flushed to disk (``fsync``), renamed over the target
(``os.replace`` is atomic on POSIX) and the folder entry is flushed too. A crash or ``kill -9`` at any
moment leaves either the previous file or the new one under the real name, never a partial file;
at worst a temp file whose writer is dead, which :func:`remove_stale_temp_files` deletes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_link", "atomic_write", "remove_stale_temp_files", "sha256_file", "temp_path"]

_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


def temp_path(path: str | Path, pid: int | None = None) -> Path:
    """The temp file :func:`atomic_write` uses for ``path`` in process ``pid`` (default: this one):
    ``<folder>/.<name>.tmp-<pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def fsync_dir(folder: str | Path) -> None:
    """Flush ``folder``'s entries to disk (after a rename or a new file in it), so that the change
    survives a power loss (POSIX: fsync of the directory's file descriptor).

    Raises:
        OSError: the folder cannot be opened (missing, no permission).
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: temp file in the same folder, fsync, rename, fsync the folder.

    Args:
        path: the target file; its folder is created if missing.
        content: ``bytes`` or ``str`` (UTF-8) to write, or a writer callback called with the temp
            file's path that creates that file (``lambda p: torch.save(obj, p)``,
            ``lambda p: fig.savefig(p, format="png")``). The temp name has no meaningful suffix, so
            writers that guess a format from it must be told the format.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        Whatever the writer or the file system raises; the temp file is removed first and the
        previous content of ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_link(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` name the same file as ``src`` atomically: a hard link under :func:`temp_path` renamed over
    ``dst`` (no data copied); where the file system refuses hard links, an :func:`atomic_write` copy.

    Raises:
        OSError: ``src`` missing or unreadable; ``dst``'s previous content is then untouched.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    tmp = temp_path(dst)
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:
        tmp.unlink(missing_ok=True)
        if not src.is_file():
            raise
        return atomic_write(dst, lambda t: shutil.copyfile(src, t))
    try:
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return dst


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0; one owned by another user counts as
    alive). ``pid <= 0`` is never alive (it would address a process group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temp files of :func:`atomic_write` / :func:`atomic_link` in ``folder`` whose writer is gone.

    Only names of that pattern, ``.<name>.tmp-<pid>``, are considered; a file whose pid is alive on this
    machine (a writer still at work, or this process) is kept. Pids are those of this machine, so call it
    where the writers ran (the run's main process at start-up).

    Args:
        recursive: also in every sub-folder (symbolic links to folders are not followed).

    Returns:
        The removed paths (empty if ``folder`` does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for parent, dirs, names in os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]:
        dirs.sort()
        for name in sorted(names):
            m = _TEMP_RE.match(name)
            p = Path(parent) / name
            if m and p.is_file() and not p.is_symlink() and not pid_alive(int(m.group(1))):
                try:
                    p.unlink()
                except FileNotFoundError:  # removed concurrently
                    continue
                removed.append(p)
    return removed


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest (64 lowercase hex chars) of a file, read in 1 MiB blocks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
