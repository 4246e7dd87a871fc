"""Processes vs threads on a CPU node: 1 process x N threads against N DDP processes x 1 thread.

Usage (from the repository root; about 4 minutes on 2 cores at the defaults)::

    .venv/bin/python bench/procs.py                   # feature extraction and fine-tuning, 2 cores
    .venv/bin/python bench/procs.py --modes ft --steps 40

Each layout trains ``configs/ants_bees_lite0.yaml`` (ants/bees shards, ``--size`` px, global batch
``--batch``, one micro-batch per rank and step, ``--workers`` loader workers per process) for
``--steps`` optimizer steps through ``trainer/main.py``: once as one process with ``OMP_NUM_THREADS=N``,
once under ``accelerate launch --multi_gpu --num_processes N`` on the CPU (gloo DDP) with
``OMP_NUM_THREADS=1`` per process. The figure is the trainer's own ``train/images_per_s`` (all ranks'
samples over the logging window, ``train.log_every_steps`` = 5), the median over the windows that are
not the first of an epoch (those include the loader start-up). ``train.mixed_precision`` is ``auto``
(what a user gets on this machine; printed), the same for both layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("BENCH_DATA_ROOT", REPO.parent / "shared" / "data" / "hymenoptera_data"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _run(mode: str, procs: int, args, out: Path) -> dict:
    """One training run; returns the median windowed images/s and the resolved precision."""
    per_rank = args.batch // procs
    ov = {"data.root": DATA_ROOT, "data.shard_dir": args.shard_dir, "data.num_workers": args.workers,
          "data.image_size": args.size, "train.global_batch_size": args.batch, "train.micro_batch_size": per_rank,
          "train.eval_batch_size": per_rank, "train.max_steps": args.steps, "train.epochs": args.epochs,
          "train.output_dir": out, "train.log_every_steps": 5, "train.resume": False, "train.overwrite": True,
          "logging.wandb": "disabled", "logging.progress": False, "optim.warmup_steps": 0,
          "finetune.freeze": "backbone" if mode == "fe" else "none"}
    cli = ["trainer/main.py", "--config", "configs/ants_bees_lite0.yaml", *[f"--{k}={v}" for k, v in ov.items()]]
    threads = args.cores // procs
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "TRAINER_OFFLINE": "1"}
    if procs == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
               "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000), *cli]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seen_epochs, rates = set(), []
    for row in rows:
        if "train/images_per_s" in row:
            if row["epoch"] in seen_epochs:
                rates.append(row["train/images_per_s"])
            seen_epochs.add(row["epoch"])
    import yaml
    precision = yaml.safe_load((out / "config.yaml").read_text())["train"]["mixed_precision"]
    return {"images_per_s": statistics.median(rates), "windows": len(rates), "precision": precision,
            "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="fe,ft")
    ap.add_argument("--steps", type=int, default=45, help="optimizer steps per run")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="global batch size")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=1, help="loader workers per process")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--shard_dir", default=str(REPO / "data" / "shards" / "hymenoptera"))
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_procs_"))
    print(f"# bench/procs.py: {args.cores} cores, {args.size} px, global batch {args.batch}, {args.steps} steps, "
          f"{args.workers} loader worker(s) per process, load avg {os.getloadavg()[0]:.1f}", flush=True)
    print("| mode | precision | 1 process x threads img/s | processes x 1 thread img/s | ratio |")
    print("|---|---|---:|---:|---:|")
    try:
        for mode in args.modes.split(","):
            one = _run(mode, 1, args, tmp / f"{mode}_1")
            many = _run(mode, args.cores, args, tmp / f"{mode}_{args.cores}")
            print(f"| {'feature extraction' if mode == 'fe' else 'fine-tuning'} | {one['precision']} | "
                  f"{one['images_per_s']:.1f} (1 x {one['threads']}) | {many['images_per_s']:.1f} "
                  f"({args.cores} x {many['threads']}) | {many['images_per_s'] / one['images_per_s']:.2f}x |",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
