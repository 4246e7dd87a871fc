"""Small real-image datasets for end-to-end tests: a deterministic subset of ants/bees, sharded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

HYMENOPTERA = Path(os.environ.get("HYMENOPTERA_ROOT",
                                  Path(__file__).resolve().parents[2].parent / "shared/data/hymenoptera_data"))


def subset_folder(dest: Path, per_class: dict[str, dict[str, int]]) -> Path:
    """Copy the first N images (sorted by name) of each split/class into ``dest/{split}/{class}``.

    Args:
        per_class: ``{"train": {"ants": 16, "bees": 16}, "val": {...}}``.
    """
    for split, counts in per_class.items():
        for cls, n in counts.items():
            src = sorted(p for p in (HYMENOPTERA / split / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
            assert len(src) >= n, f"{HYMENOPTERA}/{split}/{cls} has {len(src)} images, need {n}"
            out = dest / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for p in src[:n]:
                shutil.copy(p, out / p.name)
    return dest


def tiny_overrides(root: Path, shard_dir: Path, out_dir: Path, **extra) -> list[str]:
    """Command-line overrides for a short CPU run on ``root`` (no W&B, no progress bar)."""
    ov = {"data.root": root, "data.shard_dir": shard_dir, "data.samples_per_shard": 8,
          "data.num_workers": 1, "train.output_dir": out_dir, "train.global_batch_size": 8,
          "train.micro_batch_size": 4, "logging.wandb": "disabled", "logging.progress": "false"}
    ov.update(extra)
    return [f"--{k}={v}" for k, v in ov.items()]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the rendezvous of multi-process tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_metrics(run_dir: Path) -> list[dict]:
    """Every record of a finished run's ``metrics.jsonl``, in order (a missing file or a bad line raises)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
