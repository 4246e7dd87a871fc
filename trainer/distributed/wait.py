"""Work done by the main process while the other ranks wait without a collective deadline.

A barrier (``accelerator.wait_for_everyone``) fails after the process group's timeout
(``train.dist_timeout_s``); writing the shards of a large folder can take longer. Instead the main
process runs the work and then sets a key in the process group's key-value store (the c10d store the
ranks rendezvoused through); the other ranks poll that key (``store.check``, no timeout) and log how
long they have waited every minute. An error on the main process reaches the others as the same
exception type (``ConfigError`` / ``DataError``) with its message, so every rank stops with one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from itertools import count

log = logging.getLogger("trainer")

_calls = count()


def _store():
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store() if dist.is_available() and dist.is_initialized() else None


def main_first(fn: Callable[[], None], accelerator, *, what: str, poll_s: float = 0.5,
               errors: tuple[type[Exception], ...] = ()) -> None:
    """Run ``fn`` on the main process; the other ranks wait (no timeout) until it is done.

    Args:
        what: a short description for the waiting ranks' log ("writing shards").
        errors: exception types re-raised on the other ranks with the main process's message (any other
            failure becomes a ``RuntimeError`` there).

    Raises:
        whatever ``fn`` raises (main process); on the others, the same type if listed in ``errors``.
    """
    store = _store() if accelerator.num_processes > 1 else None
    if store is None:
        if accelerator.is_main_process:
            fn()
        return
    key = f"trainer/main_first/{next(_calls)}"
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as exn:
            store.set(key, f"{type(exn).__name__}\0{exn}")
            _wait_for_readers(store, key, accelerator.num_processes - 1)
            raise
        store.set(key, "ok")
        _wait_for_readers(store, key, accelerator.num_processes - 1)
        return
    t0 = last = time.monotonic()
    while not store.check([key]):
        time.sleep(poll_s)
        if time.monotonic() - last >= 60:
            last = time.monotonic()
            log.warning("rank %d: waiting for the main process (%s) for %.0f s", accelerator.process_index, what,
                        last - t0)
    status = store.get(key).decode("utf-8", "replace")
    store.add(f"{key}/seen", 1)
    if status != "ok":
        name, _, msg = status.partition("\0")
        for typ in errors:
            if typ.__name__ == name:
                raise typ(msg)
        raise RuntimeError(f"the main process failed while {what}: {name}: {msg}")


def _wait_for_readers(store, key: str, n: int, limit_s: float = 120.0) -> None:
    """Main process: wait (briefly; they only had to read a key) until the ``n`` other ranks have read
    the status, so the store it hosts outlives their reads even if this process exits next."""
    t0 = time.monotonic()
    while store.add(f"{key}/seen", 0) < n and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
