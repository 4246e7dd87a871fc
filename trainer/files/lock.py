"""An exclusive lock between processes, possibly on several hosts sharing a file system, that a crash never wedges.

The lock is a file (for a shard folder ``<parent>/<name>``: ``<parent>/.<name>.lock``) holding one JSON
record: ``host`` (host name), ``boot_id`` and ``pid_ns`` (Linux: which boot of the machine, which pid
namespace, so a container or a reboot is not mistaken for this process table), ``pid``, ``started``
(Unix time), ``what`` (e.g. "writing shards") and a random ``token``. It is created whole or not at all:
the record is written to ``.<name>.lock.tmp-<host>-<pid>-<thread>`` and hard-linked to the lock name, which fails
if the name exists (atomic on local file systems and on NFS; where hard links are refused, an
``O_CREAT | O_EXCL`` create). The heartbeat is the file's modification time: a thread of the holder
touches it every :data:`HEARTBEAT_S` seconds.

A waiter polls. It takes a lock over (renames it aside, with a warning saying why) when it is stale:

* its ``host`` is this host and its process is gone (``pid`` dead or a zombie in the same pid
  namespace, or the host rebooted since): at once;
* its heartbeat is older than :data:`STALE_AFTER_S` seconds, measured both as the waiter's clock minus
  the file's mtime and as how long the waiter has seen the mtime unchanged (so a dead holder on another
  host, a hung one, or a reused pid never blocks for longer than that; host clocks must agree to within
  ``STALE_AFTER_S - HEARTBEAT_S``, which NTP gives by far).

While it waits it logs one warning saying who holds the lock (host, pid, since when, last heartbeat),
repeated every :data:`REPORT_EVERY_S` seconds. A holder whose lock was taken over (it stopped for longer
than ``STALE_AFTER_S``) finds out in :meth:`HostLock.verify` and must not commit anything; release
never deletes a lock that is not its own. The lock is re-entrant within one thread (:func:`locked`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.files.atomic import pid_alive

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
"""Seconds between two heartbeats (touches of the lock file) of the holder."""
STALE_AFTER_S = 120.0
"""A lock without a heartbeat for this many seconds is stale (any host). Covers NFS attribute caching
(``acregmax`` 60 s by default) plus :data:`HEARTBEAT_S`."""
REPORT_EVERY_S = 60.0
"""A waiter repeats its "waiting for ..." warning this often (seconds)."""


class LockLost(RuntimeError):
    """The lock was taken over by another process (this holder stopped for longer than the stale limit)."""


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process of this machine (a zombie, killed but not yet reaped, is not)."""
    if not pid_alive(pid):
        return False
    stat = _read_text(f"/proc/{pid}/stat")
    return not (stat and stat.rpartition(")")[2].split()[:1] == ["Z"])


def host_name() -> str:
    """This host's name with characters other than letters, digits, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^\w-]", "_", socket.gethostname())


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class LockInfo:
    """The record in a lock file (see the module docstring)."""

    host: str
    pid: int
    started: float
    token: str
    what: str = ""
    boot_id: str | None = None
    pid_ns: str | None = None

    @classmethod
    def mine(cls, what: str) -> LockInfo:
        """A new record for this process."""
        return cls(host=host_name(), pid=os.getpid(), started=time.time(), token=uuid.uuid4().hex, what=what,
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id"), pid_ns=_pid_ns())

    def describe(self) -> str:
        """E.g. ``writing shards: pid 123 on node7 since 2024-05-01 10:00:00``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.what + ': ' if self.what else ''}pid {self.pid} on {self.host} since {since}"


def stale_reason(info: LockInfo | None, age_s: float, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why a lock is stale (rules: module docstring), or None while its holder may be alive.

    Args:
        info: the lock's record (None: unreadable, judged by its heartbeat only).
        age_s: seconds since its last heartbeat.
    """
    if info is not None and info.host == host_name():
        boot = _read_text("/proc/sys/kernel/random/boot_id")
        if info.boot_id and boot and info.boot_id != boot:
            return f"this host ({info.host}) rebooted since pid {info.pid} took it"
        if (not info.pid_ns or info.pid_ns == _pid_ns()) and not _running(info.pid):
            return f"its process (pid {info.pid} on this host) is gone"
    if age_s > stale_after_s:
        return f"no heartbeat for {age_s:.0f} s (limit {stale_after_s:.0f} s)"
    return None


def read_lock(path: str | os.PathLike) -> tuple[LockInfo | None, os.stat_result] | None:
    """``(record, stat)`` of the lock file ``path`` (record None if unreadable), or None if there is none."""
    try:
        st = os.stat(path)
        raw = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
        return LockInfo(**{k: obj[k] for k in LockInfo.__dataclass_fields__ if k in obj}), st
    except (ValueError, TypeError, KeyError):
        return None, st


class HostLock:
    """An exclusive lock on the file ``path`` (protocol: module docstring). Use :func:`locked`.

    Args:
        what: shown to waiters ("writing shards").
        heartbeat_s, stale_after_s: see :data:`HEARTBEAT_S`, :data:`STALE_AFTER_S`.
        poll_s: how often a waiter looks again.
        timeout_s: give up waiting after this long (None: wait while the holder is alive).
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "", heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, poll_s: float = 0.2, timeout_s: float | None = None):
        self.path = Path(path)
        self.what, self.heartbeat_s, self.stale_after_s = what, heartbeat_s, stale_after_s
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self.info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _side(self, kind: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{kind}-{host_name()}-{os.getpid()}-{threading.get_ident()}")

    def _create(self, info: LockInfo) -> bool:
        """Create the lock file holding ``info`` if there is none; whether this did."""
        tmp = self._side("tmp")
        tmp.write_text(json.dumps(info.__dict__) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info.__dict__) + "\n")
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, token: str | None, reason: str, holder: str) -> None:
        """Move the stale lock (the one with ``token``) aside; put back a lock that changed meanwhile."""
        aside = self._side("stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # released or taken over by another waiter meanwhile
        got = read_lock(aside)
        if got is not None and (got[0].token if got[0] else None) != token:  # a fresh lock: not ours to break
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            log.warning("%s: took over the stale lock %s (%s): %s", self.what or "lock", self.path, holder, reason)
        aside.unlink(missing_ok=True)

    def _clean_leftovers(self) -> None:
        """Remove this lock's temp/aside files left by dead processes of this host."""
        pat = re.compile(rf"^{re.escape(self.path.name)}\.(?:tmp|stale)-(.+)-(\d+)-\d+$")
        for p in self.path.parent.iterdir():
            m = pat.match(p.name)
            if m and m.group(1) == host_name() and not pid_alive(int(m.group(2))):
                p.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Wait until this process holds the lock (taking over a stale one), then start the heartbeat.

        Raises:
            TimeoutError: ``timeout_s`` passed while a live holder kept the lock (names it).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = LockInfo.mine(self.what)
        t0 = time.monotonic()
        last_report, seen, seen_at = None, None, t0
        while not self._create(info):
            got = read_lock(self.path)
            if got is None:
                continue  # released just now
            holder, st = got
            now = time.monotonic()
            key = (st.st_mtime_ns, holder.token if holder else None)
            if key != seen:
                seen, seen_at = key, now
            age = max(time.time() - st.st_mtime, now - seen_at)
            who = holder.describe() if holder else "an unreadable lock record"
            reason = stale_reason(holder, age, self.stale_after_s)
            if reason:
                self._take_over(key[1], reason, who)
                continue
            if self.timeout_s is not None and now - t0 > self.timeout_s:
                raise TimeoutError(f"{self.path}: still held after {now - t0:.0f} s ({who})")
            if last_report is None or now - last_report >= REPORT_EVERY_S:
                last_report = now
                log.warning("waiting for the lock %s held by %s (last heartbeat %.0f s ago; taken over after "
                            "%.0f s without one)", self.path, who, age, self.stale_after_s)
            time.sleep(self.poll_s)
        self.info = info
        self._clean_leftovers()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def holds(self) -> bool:
        """Whether the lock file still holds this holder's record."""
        got = read_lock(self.path)
        return self.info is not None and got is not None and got[0] is not None and got[0].token == self.info.token

    def verify(self) -> None:
        """Raise :class:`LockLost` unless this holder still holds the lock (call before committing)."""
        if not self.holds():
            got = read_lock(self.path)
            now = got[0].describe() if got and got[0] else "nobody"
            raise LockLost(f"{self.path}: this process lost the lock (held now by {now}); nothing was committed")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.holds():
                log.warning("%s: the lock was taken over by another process; this one will not commit", self.path)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holds():
            self.path.unlink(missing_ok=True)
        self.info = None


_held: dict[tuple[str, int], list] = {}  # (lock path, thread id) -> [HostLock, depth]


@contextlib.contextmanager
def locked(path: str | os.PathLike, **kw) -> Iterator[HostLock]:
    """Hold the lock ``path`` for the ``with`` block (re-entrant in one thread; ``kw``: :class:`HostLock`).

    Raises:
        TimeoutError: as :meth:`HostLock.acquire`.
    """
    key = (os.path.abspath(path), threading.get_ident())
    if key in _held:
        _held[key][1] += 1
        try:
            yield _held[key][0]
        finally:
            _held[key][1] -= 1
        return
    lock = HostLock(path, **kw)
    lock.acquire()
    _held[key] = [lock, 1]
    try:
        yield lock
    finally:
        del _held[key]
        lock.release()


def held(path: str | os.PathLike) -> HostLock | None:
    """The lock ``path`` if this thread holds it (inside :func:`locked`), else None."""
    entry = _held.get((os.path.abspath(path), threading.get_ident()))
    return entry[0] if entry else None
