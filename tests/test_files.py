"""trainer.files (the atomic writer, stale temp-file clean-up, checksums) and trainer.data.seeds (string seeds)."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from trainer.files.atomic import atomic_write, remove_stale_temp_files, sha256_file, temp_path
from trainer.data.seeds import seed_int


def test_atomic_write_bytes_text_and_writer(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    assert atomic_write(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(target, "h\u00e9")
    assert target.read_text(encoding="utf-8") == "h\u00e9"
    atomic_write(target, lambda p: torch.save({"x": 3}, p))
    assert torch.load(target)["x"] == 3
    assert sorted(os.listdir(target.parent)) == ["out.bin"]


def test_atomic_write_failure_keeps_previous_and_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "old")

    def broken(p):
        p.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_remove_stale_temp_files_keeps_live_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited: no process with this pid (reuse within the test is negligible)
    stale = temp_path(tmp_path / "last.pt", dead_pid)
    live = temp_path(tmp_path / "best.pt")  # this process
    other = tmp_path / ".notes.tmp"  # not a temp name of atomic_write
    for p in (stale, live, other, tmp_path / "last.pt"):
        p.write_text("x")
    assert stale.name == f".last.pt.tmp-{dead_pid}"
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "last.pt"])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom((1 << 20) + 17)  # crosses the 1 MiB block boundary
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_seed_int_is_stable_and_in_range():
    # first 8 bytes of sha256("augment/0"), little-endian, >> 1: fixed across processes and hash seeds
    expected = int.from_bytes(hashlib.sha256(b"augment/0").digest()[:8], "little") >> 1
    assert seed_int("augment/0") == expected
    assert seed_int("augment/0") != seed_int("augment/1")
    out = subprocess.run([sys.executable, "-c", "from trainer.data.seeds import seed_int; print(seed_int('augment/0'))"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(out.stdout) == expected
    assert 0 <= expected < 2 ** 63
    torch.Generator().manual_seed(expected)
