"""bench/train.py runs end to end on a few steps: it instruments the trainer from outside (the names it
patches must exist), so a refactor of the trainer that breaks it fails here, not in the next benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.realdata import HYMENOPTERA

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/data/hymenoptera_data")
def test_bench_train_prints_the_throughput_table(tmp_path):
    p = subprocess.run([sys.executable, "bench/train.py", "--modes", "fe", "--precisions", "fp32", "--steps", "4",
                        "--warmup", "1", "--batch", "8", "--size", "96", "--workers", "1",
                        "--shard_dir", str(tmp_path / "shards")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| feature extraction | fp32 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    alone, trainer, frac = float(cells[2]), float(cells[3]), float(cells[4])
    # the cells are rounded (img/s to 0.1, the fraction to 0.01): on a loaded machine the rates are small and
    # their rounding alone moves trainer / alone by up to 0.05 x (1 + trainer / alone) / alone
    tol = 0.006 + 0.05 * (1 + trainer / alone) / alone
    assert alone > 0 and trainer > 0 and frac == pytest.approx(trainer / alone, abs=tol)
    assert "feature extraction fp32:" in p.stdout and "of model alone" in p.stdout
