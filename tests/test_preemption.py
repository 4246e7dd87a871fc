"""Failure case 14: preemption signals through the REAL trainer, and kill -9 during a checkpoint write.

* SIGUSR1 (and separately SIGTERM alone) sent to rank 1 only, mid-training, 2 processes under
  ``accelerate launch``: the handler only sets a flag, both ranks agree at the next step, one
  checkpoint ``last.pt`` is written atomically (no temp file left) with the stop reason, and the job
  exits 0 (so the batch script requeues it; ``trainer/distributed/signals.py``). Resuming then continues from it.
* ``kill -9`` of a process in the middle of ``checkpoint.atomic_save`` of a large checkpoint: the
  previous ``last.pt`` is intact and is what ``latest_checkpoint`` returns; the temp file is ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers.launch_util import (
    REPO,
    accelerate_cmd,
    child_env,
    last_train_step,
    rank_pid,
    read_metrics,
    wait_for,
)
from helpers.realdata import HYMENOPTERA, free_port, subset_folder, tiny_overrides

from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint.files import latest_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    subset_folder(root / "img", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 2, "bees": 2}})
    return root


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_to_one_rank_real_trainer(images, tmp_path, sig):
    out = tmp_path / "run"
    # 16 images, global batch 4 -> 4 steps/epoch, 40 steps in all: the signal lands long before the end
    args = ["--config", "configs/ants_bees_lite0.yaml",
            *tiny_overrides(images / "img", tmp_path / "shards", out,
                            **{"train.epochs": 10, "train.global_batch_size": 4, "train.micro_batch_size": 2,
                               "train.log_every_steps": 1, "data.augment": "none",
                               "optim.warmup_steps": 0})]
    cmd = accelerate_cmd("trainer/main.py", *args, nproc=2, port=free_port())
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: last_train_step(out) >= 2, 240, "training step 2", proc)
        pid1 = rank_pid(proc.pid, 1)
        assert pid1 is not None
        os.kill(pid1, sig)  # rank 1 only; rank 0 never receives a signal
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-4000:]  # exit for requeue, not a failure
    state = ckpt_lib.load(out / "checkpoints/last.pt")
    assert state["reason"] == f"preempted (signal {int(sig)})", output[-3000:]
    assert 2 <= state["step"] < 40
    assert output.count("(preempted (signal") == 1  # one checkpoint written for the stop
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []  # no temp file
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # both ranks took part in the save
    assert last_train_step(out) == state["step"]  # no rank trained past the agreed step
    assert "Traceback" not in output and "SIGABRT" not in output, output[-3000:]

    # the next start resumes from it (as the requeued job would) and stops at max_steps
    resumed = subprocess.run(accelerate_cmd("trainer/main.py", *args, "--train.max_steps", str(state["step"] + 2),
                                            nproc=2, port=free_port()),
                             cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at epoch {state['epoch']} step {state['step']}" in resumed.stderr
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, state["step"] + 3))  # each step once, none lost


WRITER = textwrap.dedent("""
    import sys, torch
    from trainer.checkpoint import state as ckpt_lib
    big = {"format_version": ckpt_lib.FORMAT_VERSION, "kind": "resume", "step": 2,
           "model": {f"w{i}": torch.randn(1024, 1024) for i in range(96)}}  # ~400 MB
    print("writing", flush=True)
    ckpt_lib.atomic_save(big, sys.argv[1])
    print("done", flush=True)
""")


@pytest.mark.slow  # a writer process killed mid-write
def test_kill9_during_checkpoint_write_keeps_previous(tmp_path):
    last = ckpt_lib.checkpoint_dir(tmp_path) / "last.pt"
    ckpt_lib.atomic_save({"format_version": ckpt_lib.FORMAT_VERSION, "kind": "resume", "step": 1}, last)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def partial_written():
            tmps = [p for p in last.parent.iterdir() if p.name.startswith(".last.pt.tmp")]
            return tmps and tmps[0].stat().st_size > 1 << 20
        wait_for(partial_written, 120, "a partial temp file", proc, poll_s=0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in last.parent.iterdir() if p.name.startswith(".last.pt.tmp")]
    assert leftovers, "the kill should have hit the write (temp file still there)"
    assert latest_checkpoint(tmp_path) == last  # the temp file is never a candidate
    assert ckpt_lib.load(last)["step"] == 1  # previous checkpoint intact
    assert ckpt_lib.load(last)["step"] == 1
