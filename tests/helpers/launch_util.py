"""Helpers for multi-process tests of the real trainer: launch commands, rank pids, metrics files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ACCELERATE = str(Path(PY).with_name("accelerate"))


def accelerate_cmd(script: str, *args: str, nproc: int, port: int, num_machines: int = 1, machine_rank: int = 0,
                   rdzv_timeout_s: int | None = None) -> list[str]:
    """``accelerate launch --multi_gpu`` of ``script`` on CPU (gloo) with a given rendezvous port."""
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if rdzv_timeout_s is not None:
        cmd += ["--rdzv_conf", f"timeout={rdzv_timeout_s}"]
    return cmd + [script, *args]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child run: one thread per process, no W&B network, repo importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """Pid of the training process with ``RANK=rank`` below the launcher (None if not started yet).

    Loader workers inherit RANK too; the rank's main process is the one whose parent lacks it.
    """
    found = []
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"trainer/main.py" in cmdline:
            found.append(pid)
    if not found:
        return None
    found_set = set(found)
    tops = [p for p in found if _ppid(p) not in found_set]
    return min(tops) if tops else None


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl (skips a partially written last line)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def last_train_step(out_dir: Path) -> int:
    steps = [r["step"] for r in read_metrics(out_dir / "metrics.jsonl") if "train/loss" in r]
    return max(steps, default=0)


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.05):
    """Poll until ``predicate()`` is truthy; fail early if ``proc`` exited, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
