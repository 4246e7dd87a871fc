"""Issue 23 defect 9: two runs writing one data.shard_dir. One writes, the other waits and reuses (or refuses);
stale locks are taken over; a reader never finds the folder missing or half swapped."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.data_synth import shard_keys_and_paths, write_class_tree
from trainer.config.schema import ConfigError, DataConfig
from trainer.data.meta import read_meta
from trainer.data.prepare import ensure_shards
from trainer.data.shard_writer import write_shards

REPO = Path(__file__).resolve().parents[1]
HOST = re.sub(r"[^\w-]", "_", socket.gethostname())
RUN = """
import hashlib, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from trainer.config.schema import DataConfig
from trainer.data.prepare import ensure_shards
import trainer.data.shard_writer  # imported before the start signal (seconds): the runs then start together
root, out, ready, go = sys.argv[1:5]
cfg = DataConfig(root=root, shard_dir=out, val_fraction=0.2, samples_per_shard=10, shard_workers=1)
Path(ready).write_text("")
while not Path(go).exists():
    time.sleep(0.002)
ensure_shards(cfg)
meta = Path(out) / "dataset.json"
print("META", meta.stat().st_ino, hashlib.sha256(meta.read_bytes()).hexdigest())
"""
HOLD = """
import sys, time
from pathlib import Path
from trainer.config.schema import DataConfig
from trainer.data import staging
from trainer.data.prepare import ensure_shards
root, out, ready = sys.argv[1:4]
with staging.shard_lock(out):
    Path(ready).write_text("")
    ensure_shards(DataConfig(root=root, shard_dir=out, val_fraction=0.2, samples_per_shard=10, shard_workers=1))
    print("INO", (Path(out) / "dataset.json").stat().st_ino, flush=True)
    time.sleep(1.0)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _wait_for(path: Path, procs, limit_s: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() - t0 < limit_s, f"{path} never appeared"
        time.sleep(0.01)


def _cfg(root: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), shard_dir=str(out), **{"val_fraction": 0.2, "samples_per_shard": 10,
                                                             "shard_workers": 1, **kw})


def _lock_record(pid: int, host: str = HOST) -> str:
    return json.dumps({"host": host, "pid": pid, "started": time.time() - 5, "token": "f" * 32,
                       "what": "writing shards"})


@pytest.mark.slow  # two Python processes
@pytest.mark.timeout(120)
def test_two_runs_started_together_write_once_and_end_with_the_same_dataset(tmp_path):
    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root, {"a": 90, "b": 60})
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(root), str(out), str(tmp_path / f"ready{i}"),
                               str(tmp_path / "go")], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for i in range(2):
        _wait_for(tmp_path / f"ready{i}", procs)
    (tmp_path / "go").write_text("")  # both start together on the same missing shard_dir
    outs = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = "".join(err for _, err in outs)
    assert logs.count("writing shards of") == 1, logs  # one wrote ...
    assert logs.count("reusing the shards") == 1, logs  # ... the other waited and reused its shards
    metas = {line for o, _ in outs for line in o.splitlines() if line.startswith("META")}
    assert len(metas) == 1  # both ended with the same dataset.json (same file, same content)
    meta = read_meta(out)
    assert meta.splits["train"].num_samples + meta.splits["val"].num_samples == 150
    assert len(shard_keys_and_paths(meta.shard_urls("train"))) == meta.splits["train"].num_samples
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".shards")) == []  # lock released


@pytest.mark.parametrize("reaped", [True, False])
def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog, reaped):
    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root, {"a": 6, "b": 4})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    if reaped:
        dead.wait()
    else:  # killed but not yet reaped by its parent (a zombie): gone as well
        os.waitid(os.P_PID, dead.pid, os.WEXITED | os.WNOWAIT)
    lock = tmp_path / ".shards.lock"
    lock.write_text(_lock_record(dead.pid))  # what a killed writer leaves
    with caplog.at_level(logging.WARNING):
        ensure_shards(_cfg(root, out))
    assert re.search(rf"took over the stale lock .*pid {dead.pid} on {HOST}.*is gone", caplog.text), caplog.text
    assert read_meta(out).splits["train"].num_samples == 8
    assert not lock.exists()
    dead.wait()


@pytest.mark.slow  # a second Python process
@pytest.mark.timeout(120)
def test_a_live_writer_makes_the_second_run_wait_then_reuse_its_shards(tmp_path, caplog):
    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root, {"a": 12, "b": 8})
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(out), str(tmp_path / "ready")], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "ready", [holder])
    with caplog.at_level(logging.INFO):
        ensure_shards(_cfg(root, out))  # returns once the holder released the lock
    stdout, stderr = holder.communicate(timeout=60)
    assert holder.returncode == 0, stderr
    assert re.search(rf"waiting for the lock .*\.shards\.lock held by writing shards into .*: pid {holder.pid} on "
                     rf"{HOST}", caplog.text), caplog.text
    assert "writing shards of" not in caplog.text and "reusing the shards" in caplog.text
    assert f"INO {(out / 'dataset.json').stat().st_ino}" in stdout  # the holder's dataset, not rewritten


def test_a_waiting_run_with_another_source_refuses_in_one_line(tmp_path):
    from trainer.data import staging

    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root, {"a": 6, "b": 4})
    ready, errors = threading.Event(), []

    def first_run():  # another thread counts as another holder (the lock is re-entrant per thread only)
        try:
            with staging.shard_lock(out):
                ready.set()
                ensure_shards(_cfg(root, out))
                time.sleep(0.3)
        except Exception as e:  # pragma: no cover - shown by the assertion below
            errors.append(e)
    t = threading.Thread(target=first_run)
    t.start()
    ready.wait(10)
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: 0\.5 differs from the 0\.2 .*shards") as e:
        ensure_shards(_cfg(root, out, val_fraction=0.5))
    t.join()
    assert errors == [] and "\n" not in str(e.value)
    assert read_meta(out).splits["train"].num_samples == 8


def test_other_hosts_locks_stale_only_without_heartbeat(tmp_path, caplog):
    from trainer.files.lock import HostLock, stale_reason

    path = tmp_path / ".x.lock"
    path.write_text(_lock_record(4242, host="otherhost"))  # a live pid elsewhere cannot be checked from here
    with pytest.raises(TimeoutError, match="pid 4242 on otherhost"):
        HostLock(path, stale_after_s=60, poll_s=0.02, timeout_s=0.2).acquire()
    os.utime(path, (time.time() - 500, time.time() - 500))  # its last heartbeat: 500 s ago
    lock = HostLock(path, stale_after_s=120, poll_s=0.02, timeout_s=5)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert re.search(r"took over the stale lock .*pid 4242 on otherhost.*no heartbeat for 50\d s", caplog.text)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert stale_reason(None, 10.0, 120.0) is None and "no heartbeat" in stale_reason(None, 121.0, 120.0)


def test_the_holder_heartbeats_and_a_lock_that_stops_beating_is_taken_over(tmp_path):
    from trainer.files.lock import HostLock

    path = tmp_path / ".x.lock"
    first = HostLock(path, heartbeat_s=0.05)
    first.acquire()
    before = path.stat().st_mtime_ns
    time.sleep(0.3)
    assert path.stat().st_mtime_ns > before  # the heartbeat touches the file
    first._stop.set()  # as if the holder hung: no more heartbeats
    first._thread.join()
    t0 = time.monotonic()
    second = HostLock(path, stale_after_s=0.5, poll_s=0.02, timeout_s=10)
    second.acquire()  # the same live pid, but no heartbeat for longer than the limit
    assert 0.4 < time.monotonic() - t0 < 5
    assert not first.holds() and second.holds()
    first.release()  # not its lock any more: left alone
    assert path.exists()
    second.release()
    assert not path.exists()


def test_a_writer_whose_lock_was_taken_over_commits_nothing(tmp_path):
    from trainer.data import staging
    from trainer.files.lock import LockLost

    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root / "train", {"a": 3})
    with staging.shard_lock(out) as lock:
        path = lock.path
        path.write_text(_lock_record(os.getpid()))  # another token: someone judged this writer stale
        with pytest.raises(LockLost, match="lost the lock"):
            write_shards(root, out, splits="train")
    assert not out.exists() and path.exists()  # nothing committed, the other holder's lock left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards.lock", "imgs"]


def _check_dataset(out: Path) -> str | None:
    """What is wrong with ``out`` for a reader at this instant (None: a complete dataset)."""
    try:
        if not out.is_dir():
            return f"{out} missing"
        meta = read_meta(out)
        missing = [u for s in meta.splits for u in meta.shard_urls(s) if not os.path.isfile(u)]
        return f"shards listed but missing: {missing}" if missing else None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_a_reader_never_sees_the_folder_missing_while_a_dataset_is_replaced(tmp_path, monkeypatch):
    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root / "train", {"a": 8, "b": 6})
    write_class_tree(root / "val", {"a": 2, "b": 2}, seed=50)
    write_shards(root, out, max_samples_per_shard=4)
    seen: list[str] = []
    old_meta = read_meta(out)
    old_view = shard_keys_and_paths(old_meta.shard_urls("train"))

    def checked(fn):  # every rename / replace / deletion: the folder holds a complete dataset right after it
        def wrapper(*a, **kw):
            result = fn(*a, **kw)
            problem = _check_dataset(out)
            if problem:
                seen.append(f"after {fn.__name__}{a[:2]}: {problem}")
            return result
        return wrapper
    for mod, name in ((os, "rename"), (os, "replace"), (Path, "rename"), (Path, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(mod, name, checked(getattr(mod, name)))
    stop = threading.Event()

    def poll():  # a reader listing and opening the shards all along
        while not stop.is_set():
            problem = _check_dataset(out)
            if problem:
                seen.append(f"poll: {problem}")
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(3):
            write_class_tree(root / "train", {"a": 1}, seed=100 + i, prefix=f"new{i}")
            write_shards(root, out, max_samples_per_shard=4, overwrite=True)
            if i == 0:  # a reader that opened the first version still reads exactly it
                assert shard_keys_and_paths(old_meta.shard_urls("train")) == old_view
    finally:
        stop.set()
        reader.join()
    assert seen == []
    meta = read_meta(out)
    assert meta.splits["train"].num_samples == 17 and meta.splits["train"].shards[0].startswith("v4/")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "v3", "v4"]  # versions 1 and 2 deleted
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")) == []


def test_shards_in_a_read_only_folder_are_reused_without_a_lock(tmp_path, monkeypatch):
    from trainer.files.lock import HostLock

    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_class_tree(root, {"a": 6, "b": 4})
    ensure_shards(_cfg(root, out))

    def read_only(self, info):
        raise PermissionError(13, "Permission denied", str(self.path))
    monkeypatch.setattr(HostLock, "_create", read_only)  # (chmod does not stop root, who runs the CI)
    ensure_shards(_cfg(root, out))  # a prepared dataset on a read-only share: reused
    with pytest.raises(PermissionError):
        ensure_shards(_cfg(root, tmp_path / "new"))  # nothing to reuse: the write could not be locked
