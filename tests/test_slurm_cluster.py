"""End-to-end on a real one-node Slurm cluster (fixture in tests/conftest_slurm.py): ``sbatch
slurm/finetune.sh`` with the REAL trainer on CPU, preempted, requeued, resumed, finished.

The job runs 2 gloo processes (``FINETUNE_CPU=1 FINETUNE_PROCS_PER_NODE=2``, ``-c 2``) on a tiny
real-image config (16 train / 4 val images, 12 steps, ``last.pt`` every 2 steps). When the run has
trained a few steps the test sends SIGUSR1 to the batch shell (``scancel --batch --signal=USR1``,
what ``--signal=B:USR1@120`` makes Slurm do before the time limit; the time-limit timing itself is
Slurm's, measured in /work/shared/docs/slurm-local.md). Expected: the trap forwards the signal, both
ranks stop at the same step and write one checkpoint, the job requeues itself (Restarts=1), the
second run resumes from that checkpoint and finishes; its final validation metrics match an
uninterrupted 2-process run of the same config. Costs about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import subprocess

import pytest
from helpers.launch_util import (
    REPO,
    accelerate_cmd,
    child_env,
    last_train_step,
    read_metrics,
)
from helpers.realdata import HYMENOPTERA, free_port, subset_folder, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")]


def _overrides(root, out):
    return tiny_overrides(root / "img", root / "shards", out, **{
        "train.epochs": 3, "train.global_batch_size": 4, "train.micro_batch_size": 2,
        "train.checkpoint_every_steps": 2, "train.log_every_steps": 1, "data.augment": "none",
        "optim.warmup_steps": 0})


def _final_eval(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "val/top1" in r][-1]


def test_finetune_sh_real_trainer_preempt_requeue_resume(slurm_cluster, tmp_path):
    subset_folder(tmp_path / "img", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 2, "bees": 2}})
    # shards once, so both runs read the same files (the job would otherwise write them itself)
    ref_out = tmp_path / "reference"
    ref = subprocess.run(accelerate_cmd("trainer/main.py", "--config", "configs/ants_bees_lite0.yaml",
                                        *_overrides(tmp_path, ref_out), nproc=2, port=free_port()),
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]

    run_dir = tmp_path / "run"
    out = tmp_path / "finetune.out"
    env = child_env(FINETUNE_CPU="1", FINETUNE_PROCS_PER_NODE="2", FINETUNE_SHUTDOWN_TIMEOUT="60",
                    FINETUNE_PORT=str(free_port()))
    job = slurm_cluster.sbatch(
        "--gpus-per-node=0", f"-c{min(2, slurm_cluster.cpus)}", "--time=15", f"--output={out}",
        "slurm/finetune.sh", "configs/ants_bees_lite0.yaml", *_overrides(tmp_path, run_dir), env=env, cwd=REPO)
    try:
        slurm_cluster.wait_for(lambda: last_train_step(run_dir) >= 3, 300, f"job {job}: training step 3")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)

        def finished():
            f = slurm_cluster.job_fields(job)
            return f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and \
                f.get("Restarts") == "1"

        slurm_cluster.wait_for(finished, 420, f"job {job}: requeued run to finish", poll_s=1)
    finally:
        slurm_cluster.cancel(job)
    log = out.read_text()
    assert slurm_cluster.job_fields(job)["JobState"] == "COMPLETED", log[-5000:]
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log[-5000:]
    stops = [ln for ln in log.splitlines() if "saved last.pt" in ln and "preempted (signal 10)" in ln]
    assert len(stops) == 1, log[-5000:]  # one checkpoint for the stop, written by rank 0
    stop_step = int(stops[0].split("at step ")[1].split()[0])
    assert 3 <= stop_step < 12
    assert f"step {stop_step} (samples_seen {4 * stop_step})" in log  # second run resumed from it
    assert "restart 1]" in log and "training step ended with status 0" in log
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))  # each step once

    got, want = _final_eval(run_dir), _final_eval(ref_out)
    assert got["step"] == want["step"] == 12 and got["epoch"] == want["epoch"] == 3
    assert got["val/top1"] == pytest.approx(want["val/top1"], abs=1e-6)
    assert got["val/loss"] == pytest.approx(want["val/loss"], abs=1e-3)
    assert slurm_cluster.job_fields(job)["Restarts"] == "1"
