"""trainer/distributed/signals.py: handler only sets a flag; ranks agree (failure case 14, agreement part)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.distributed.signals import PREEMPTED_EXIT_CODE, PreemptionHandler

REPO = Path(__file__).resolve().parents[1]
FAKE_TRAINER = REPO / "tests" / "helpers" / "slurm_fake_trainer.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_handler_sets_flag_and_restores():
    previous = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler().install()
    try:
        assert handler.received_signal is None and handler.should_stop() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # second signal: first one is kept
        assert handler.received_signal == signal.SIGUSR1
        assert handler.should_stop() is True and handler.agreed_signal == signal.SIGUSR1
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) is previous
    h = PreemptionHandler().install()
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            h.install()
    finally:
        h.restore()


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _progress(out: Path, rank: int) -> int:
    try:
        return int((out / f"progress.{rank}").read_text())
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow  # two torchrun processes
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_to_one_rank_stops_both_at_same_step(tmp_path, sig):
    """2 gloo ranks; the signal goes to rank 1 only, mid-loop; both stop after the same step."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(FAKE_TRAINER),
           "--out", str(tmp_path), "--steps", "400", "--step_s", "0.05"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _progress(tmp_path, 1) >= 3 and (tmp_path / "pid.1").exists(), 60, "rank 1 at step 3")
        os.kill(int((tmp_path / "pid.1").read_text()), sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    stops = {e["rank"]: e for e in events if e["event"] == "stop"}
    assert set(stops) == {0, 1}, output
    assert stops[0]["step"] == stops[1]["step"] < 400
    assert stops[1]["received"] == sig and stops[0]["received"] is None  # only rank 1 got it
    assert stops[0]["agreed"] == stops[1]["agreed"] == sig
    assert json.loads((tmp_path / "ckpt.json").read_text())["step"] == stops[0]["step"]
    assert not [e for e in events if e["event"] == "finish"]
