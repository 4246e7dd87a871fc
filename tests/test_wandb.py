"""Failure cases 12 and 13: one W&B run per job, and the same W&B run after a preemption (offline mode).

12. 2 processes, ``logging.wandb=offline``: exactly one ``offline-run-*`` folder under
    ``<output_dir>/wandb`` (opened by the main process), its id stored in ``last.pt``; rank 1 logs
    nothing (each step once in metrics.jsonl and in the W&B history); validation metrics are reduced
    over ranks before logging (``val/num_samples`` counts both ranks' shares).
13. Checkpoint every 5 steps, ``kill -9`` at step 12, restart: the second start continues the same
    W&B run id, rewound to step 10 (``resume_from=<id>?_step=10``: W&B's rewind, stored in the offline
    run for ``wandb sync``), and logs steps 11.. again; ``metrics.jsonl`` holds each step once (the
    killed run's steps 11-12 are moved to ``metrics.rewound.jsonl``, not silently lost or duplicated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers.launch_util import (
    REPO,
    accelerate_cmd,
    child_env,
    last_train_step,
    read_metrics,
    wait_for,
)
from helpers.realdata import HYMENOPTERA, free_port, subset_folder, tiny_overrides
from helpers.wandb_offline import summary

from trainer.checkpoint import state as ckpt_lib

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb")
    subset_folder(root / "img", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 3, "bees": 3}})
    return root


def _args(images, tmp_path, out, **extra):
    ov = {"logging.wandb": "offline", "train.log_every_steps": 1, "data.augment": "none", "optim.warmup_steps": 0, **extra}
    return ["--config", "configs/ants_bees_lite0.yaml", *tiny_overrides(images / "img", tmp_path / "shards", out, **ov)]


def test_case12_one_run_per_job_two_processes(images, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(accelerate_cmd("trainer/main.py", *_args(images, tmp_path, out, **{
        "train.epochs": 1, "train.max_steps": 3, "train.global_batch_size": 4, "train.micro_batch_size": 2}),
        nproc=2, port=free_port()), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_id = ckpt_lib.load(out / "checkpoints/last.pt")["wandb_run_id"]
    assert run_id and runs[0].name.endswith(f"-{run_id}")
    assert not list(REPO.glob("wandb/offline-run-*" + run_id))  # nothing outside the run dir
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # one writer
    ev = [r for r in rows if "val/top1" in r]
    assert len(ev) == 1 and ev[0]["val/num_samples"] == 6  # both ranks' 3 samples, reduced
    hist = summary(runs[0])
    assert hist["run_id"] == run_id
    assert [s for s, h in hist["history"] if "train/loss" in h] == [1, 2, 3]
    wb_eval = [h for s, h in hist["history"] if "val/top1" in h]
    assert len(wb_eval) == 1 and wb_eval[0]["val/num_samples"] == 6


def test_case13_same_run_after_kill_and_resume(images, tmp_path):
    out = tmp_path / "run"
    # 16 images, batch 2 -> 8 steps/epoch; last.pt at steps 5 (interval), 8 (epoch end), 10 (interval)
    args = _args(images, tmp_path, out, **{"train.epochs": 2, "train.max_steps": 16, "train.global_batch_size": 2,
                                           "train.micro_batch_size": 2, "train.checkpoint_every_steps": 5})
    cmd = [sys.executable, "trainer/main.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: last_train_step(out) >= 12, 300, "step 12", proc, poll_s=0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # no checkpoint, no W&B finish: a hard preemption
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    killed_at = last_train_step(out)
    state = ckpt_lib.load(out / "checkpoints/last.pt")
    assert state["step"] == 10, f"killed at step {killed_at}, last.pt at {state['step']} (too slow a kill?)"
    first_id = state["wandb_run_id"]

    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stderr and "step 10" in p.stderr
    rows = read_metrics(out / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, 17))  # 11.. trained again and logged once; nothing lost
    rewound = [r["step"] for r in read_metrics(out / "metrics.rewound.jsonl") if "train/loss" in r]
    assert rewound == list(range(11, killed_at + 1))  # the killed run's records, kept aside

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{first_id}") for r in runs)  # same W&B run
    assert ckpt_lib.load(out / "checkpoints/last.pt")["wandb_run_id"] == first_id
    first, second = summary(runs[0]), summary(runs[1])
    assert second["run_id"] == first_id and second["branch_point"] == (first_id, 10.0)  # rewind to step 10
    assert [s for s, h in second["history"] if "train/loss" in h] == list(range(11, 17))
    # the killed run's offline file keeps what W&B had flushed before the kill -9 (possibly nothing);
    # steps after 10 in it are superseded by the rewind when synced
    assert set(s for s, h in first["history"] if "train/loss" in h) <= set(range(1, killed_at + 1))
