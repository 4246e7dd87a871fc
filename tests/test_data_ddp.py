"""Real 2-process run (torchrun, gloo on CPU) of the loaders: 2 ranks x 2 workers stay in lockstep,
train keys of the ranks are disjoint and cover the epoch, eval sees every sample once (cases 1-3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.data_synth import write_tar_shards

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_two_workers_lockstep_and_coverage(tmp_path):
    _, train_keys = write_tar_shards(tmp_path, [24, 24, 24, 24], prefix="train")  # 4 shards = 4 readers
    _, val_keys = write_tar_shards(tmp_path, [11, 6, 4], prefix="val")  # fewer shards than readers
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "helpers" / "data_ddp_check.py"), str(tmp_path), str(out)],
                          capture_output=True, text=True, timeout=200, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    for epoch in range(2):
        r0, r1 = (r["epochs"][epoch] for r in ranks)
        assert r0["steps"] == r1["steps"] == 6
        assert not set(r0["keys"]) & set(r1["keys"])
        assert sorted(r0["keys"] + r1["keys"]) == sorted(train_keys)
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]  # reshuffled per epoch
    assert sorted(ranks[0]["eval"] + ranks[1]["eval"]) == sorted(val_keys)
