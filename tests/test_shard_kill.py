"""Issue 15 item 3: a shard write killed (SIGKILL) at random moments never wedges the next run, which
ends with the same shards as an uninterrupted write."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.data_synth import shard_keys_and_paths, write_class_tree
from trainer.data.meta import read_meta

REPO = Path(__file__).resolve().parents[1]
WRITE = ("import sys; from trainer.config.schema import DataConfig; from trainer.data.prepare import ensure_shards; "
         "ensure_shards(DataConfig(root=sys.argv[1], shard_dir=sys.argv[2], val_fraction=0.2, samples_per_shard=25, "
         "shard_workers=2))")


def _start(root: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WRITE, str(root), str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _summary(out: Path) -> dict:
    meta = read_meta(out)
    return {split: (m.num_samples, m.class_counts, sorted(shard_keys_and_paths(meta.shard_urls(split)).items()))
            for split, m in meta.splits.items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_random_kills_then_the_next_run_succeeds(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 600, "b": 400, "c": 200})
    ref = tmp_path / "ref"
    p = _start(root, ref)
    started = _wait_for_staging(tmp_path, ".ref.", p)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    write_s = time.monotonic() - started  # the writing phase (after Python's start-up)
    expected = _summary(ref)
    out = tmp_path / "shards"
    rng = random.Random(15)
    states = []
    for _ in range(10):
        p = _start(root, out)
        _wait_for_staging(tmp_path, ".shards.", p)
        time.sleep(rng.uniform(0.0, 1.2 * write_s))  # a random moment of the write (or just after it)
        os.killpg(p.pid, signal.SIGKILL)  # the writer and its pool
        p.wait(timeout=60)
        leftovers = [x.name for x in tmp_path.iterdir() if x.name.startswith(".shards.")]
        states.append("complete" if (out / "dataset.json").is_file() else ("staging" if leftovers else "nothing"))
        if (out / "dataset.json").is_file():  # killed after the commit: never half-written; start over
            json.loads((out / "dataset.json").read_text())
            shutil.rmtree(out)
    print("states after each kill:", states, f"(writing phase {write_s:.1f} s)")
    p = _start(root, out)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert _summary(out) == expected
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".shards.")] == []  # nothing left behind
    assert states.count("staging") >= 3  # most kills landed while shards were being written


def _wait_for_staging(folder: Path, prefix: str, proc: subprocess.Popen) -> float:
    """Poll until the writer's staging folder appears (or it ends); the time it did."""
    while proc.poll() is None and not any(x.name.startswith(prefix) for x in folder.iterdir()):
        time.sleep(0.01)
    return time.monotonic()
