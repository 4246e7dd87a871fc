"""Resume (issue 5 item 3): time-based checkpoint interval, resuming on another number of processes,
and the limit that ``train.global_batch_size`` must stay the same.

Limits (documented in docs/clusters.md, resume limits): per-rank RNG states are restored only when the world size matches;
on another world size the data order and augmentation differ from an uninterrupted run (the loader
splits shards by rank), but the step count, samples_seen, lr schedule, optimizer state and W&B run
continue; a different global_batch_size is refused (steps and epochs would not line up).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.launch_util import REPO, accelerate_cmd, child_env, read_metrics
from helpers.realdata import HYMENOPTERA, free_port, subset_folder, tiny_overrides

from trainer.checkpoint import state as ckpt_lib

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")]


def test_interval_minutes_then_resume_on_one_process(tmp_path):
    subset_folder(tmp_path / "img", {"train": {"ants": 4, "bees": 4}, "val": {"ants": 1, "bees": 1}})
    out = tmp_path / "run"

    def args(**extra):
        return ["--config", "configs/ants_bees_lite0.yaml",
                *tiny_overrides(tmp_path / "img", tmp_path / "shards", out, **{
                    "train.epochs": 2, "train.global_batch_size": 2, "train.micro_batch_size": 1,
                    "data.samples_per_shard": 2, "train.log_every_steps": 1, "optim.warmup_steps": 0, **extra})]

    # 2 processes; checkpoint_every_minutes=1e-4 (6 ms): every step is past the interval
    p = subprocess.run(accelerate_cmd("trainer/main.py", *args(**{"train.max_steps": 2,
                                                                  "train.checkpoint_every_minutes": 1e-4}),
                                      nproc=2, port=free_port()),
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "saved last.pt at step 1 (interval)" in p.stderr and "saved last.pt at step 2 (epoch)" in p.stderr
    assert p.stderr.count("saved last.pt at step 2 ") == 1  # the run's last step: one write, not interval + epoch
    state = ckpt_lib.load(out / "checkpoints/last.pt")
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng"]) == 2

    # another global batch size: refused with the field named (exit 2)
    bad = subprocess.run([sys.executable, "trainer/main.py", *args(**{"train.max_steps": 4,
                                                                      "train.global_batch_size": 4})],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "train.global_batch_size: 2 -> 4" in bad.stderr, bad.stderr[-3000:]

    # the same run continued by ONE process: state restored, RNG per rank not (warned), steps continue
    one = subprocess.run([sys.executable, "trainer/main.py", *args(**{"train.max_steps": 4})],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "resumed from" in one.stderr and "step 2 (samples_seen 4)" in one.stderr
    assert "resuming on 1 processes from a checkpoint of 2" in one.stderr
    state = ckpt_lib.load(out / "checkpoints/last.pt")
    assert state["step"] == 4 and state["samples_seen"] == 8 and state["world_size"] == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    # the lr schedule continued where it was (cosine over 2 epochs x 4 steps, no warmup)
    lr = [r for r in rows if "train/loss" in r and r["step"] == 3][0]
    assert any(k.startswith("lr/") for k in lr)
