"""End-to-end tests on a real one-node Slurm cluster (fixture in tests/conftest_slurm.py).

1. The mechanism: ``--signal=B:USR1@40`` before a 1-minute limit -> the batch shell's trap forwards
   the signal to the srun task (``scancel --signal``), waits for it, ``scontrol requeue``s the job;
   the second run sees ``SLURM_RESTART_COUNT=1``. Costs about a minute (Slurm checks time limits on
   a 30 s cycle).
2. ``slurm/finetune.sh`` itself in CPU mode with 2 processes and a stand-in trainer
   (``tests/helpers/slurm_fake_trainer.py``): SIGUSR1 to the batch shell -> both ranks stop at the
   same step, one checkpoint, requeue, the second run resumes from it and finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm

SIGNAL_JOB = """#!/bin/bash
#SBATCH --time=1
#SBATCH --signal=B:USR1@40
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH -c 1
echo "run restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then
    srun PYTHON -c 'import os; print("second run sees SLURM_RESTART_COUNT=" + os.environ["SLURM_RESTART_COUNT"])'
    exit 0
fi
child=
on_usr1() {
    echo "batch shell got USR1"
    [ -n "$child" ] && scancel --signal=USR1 "$SLURM_JOB_ID"
    wait "$child"
    echo "task exited $?; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap on_usr1 USR1
srun PYTHON -c '
import signal, sys, time
def handler(signum, frame):
    print("task got signal", signum, flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, handler)
print("task started", flush=True)
while True:
    time.sleep(0.1)
' &
child=$!
wait "$child"
echo "task ended without a signal"
exit 1
"""


def test_time_limit_signal_trap_requeue(slurm_cluster, tmp_path):
    script = tmp_path / "signal_job.sh"
    script.write_text(SIGNAL_JOB.replace("PYTHON", sys.executable))
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(f"--output={out}", str(script), cwd=tmp_path)
    try:
        # a requeued job may start again after AuthInfo=cred_expire (10 s); forcing it sooner
        # (scontrol update StartTime=now) gets it killed with "Job credential revoked"
        def second_run():
            return out.exists() and "second run sees SLURM_RESTART_COUNT=1" in out.read_text()

        slurm_cluster.wait_for(second_run, 150, f"job {job} to be signalled and requeued")
        slurm_cluster.wait_for(lambda: slurm_cluster.job_fields(job).get("JobState") == "COMPLETED",
                               30, f"job {job} to complete")
    finally:
        slurm_cluster.cancel(job)
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0] == "run restart=0", text
    for expected in ("task started", "batch shell got USR1", "task got signal 10",
                     "task exited 0; requeueing", "run restart=1"):
        assert expected in lines, text
    assert "task ended without a signal" not in text
    assert slurm_cluster.job_fields(job)["Restarts"] == "1"


def test_finetune_sh_preempt_requeue_resume(slurm_cluster, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    run_dir = tmp_path / "run"
    out = tmp_path / "finetune.out"
    env = dict(os.environ, FINETUNE_CPU="1", FINETUNE_PROCS_PER_NODE="2",
               FINETUNE_ENTRY="tests/helpers/slurm_fake_trainer.py", FINETUNE_SHUTDOWN_TIMEOUT="20")
    job = slurm_cluster.sbatch(
        "--gpus-per-node=0", f"-c{min(2, slurm_cluster.cpus)}", "--time=5", f"--output={out}",
        "slurm/finetune.sh", str(config), "--out", str(run_dir), "--steps", "60", "--step_s", "0.1",
        "--accelerate", env=env, cwd=REPO)

    def progress() -> int:
        try:
            return int((run_dir / "progress.1").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def events() -> list[dict]:
        path = run_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    try:
        slurm_cluster.wait_for(lambda: progress() >= 5, 90, f"job {job}: rank 1 at step 5")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)

        def finished():
            return any(e["event"] == "finish" for e in events()) and \
                slurm_cluster.job_fields(job).get("JobState") == "COMPLETED"

        slurm_cluster.wait_for(finished, 120, f"job {job}: requeued run to finish")
    finally:
        slurm_cluster.cancel(job)
    log = out.read_text()
    evs = events()
    stops = {e["rank"]: e for e in evs if e["event"] == "stop"}
    starts = [e for e in evs if e["event"] == "start"]
    finishes = {e["rank"] for e in evs if e["event"] == "finish"}
    assert set(stops) == {0, 1} and stops[0]["step"] == stops[1]["step"] < 60, log
    assert stops[0]["agreed"] == stops[1]["agreed"] == 10, log  # SIGUSR1
    assert sorted((e["restart_count"] or "0", e["step"], e["rank"]) for e in starts) == [
        ("0", 0, 0), ("0", 0, 1), ("1", stops[0]["step"], 0), ("1", stops[0]["step"], 1)], log
    assert finishes == {0, 1}, log
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log
    assert slurm_cluster.job_fields(job)["Restarts"] == "1"
