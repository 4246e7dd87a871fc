"""Benchmark: accuracy against wall-clock budget, the planner against fixed recipes given the same wall time.

For each dataset x budget it runs, one after the other (each alone on the machine, as timed figures need):

=========  ===================================================================================================
planned    ``trainer/main.py`` with only the data and ``--train.time_budget`` (``finetune.strategy: auto``)
fixed      ``configs/finetune_lite0.yaml``: the fine-tuning recipe that reached EuroSAT's published accuracy,
           its length capped to the same budget (the lr schedule shaped over the steps that fit)
fastai     ``configs/fastai_fine_tune_lite0.yaml``: fastai's ``fine_tune`` defaults (one frozen epoch, then all
           layers at lower, discriminative lrs), capped to the same budget
=========  ===================================================================================================

Every arm times the whole command (``time.perf_counter`` around the subprocess: start-up, shards, rate
measurements, probe, training, evaluations, test pass, reports) and reads the best val top-1 and the test
top-1 from the run's ``metrics.jsonl``. The shard folders are written by the first arm that needs them
(that arm's time includes it). Printed: one row per run, and
a CSV + PNG (accuracy against budget per dataset) with ``--out``.

Usage::

    python bench/budget.py --datasets ants_bees --budgets 2 --arms planned
    python bench/budget.py --datasets sign_digits,trashnet --budgets 5,15 --out docs/budget
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
E = SHARED / "eurosat"
DATASETS = {
    "ants_bees": [f"--data.root={SHARED / 'hymenoptera_data'}", "--data.shard_dir=data/shards/hymenoptera"],
    "eurosat": [f"--data.manifest={{train: {E / 'train.csv'}, val: {E / 'validation.csv'}, test: {E / 'test.csv'}}}",
                "--data.path_column=Filename", "--data.label_column=ClassName", f"--data.label_map={E / 'label_map.json'}",
                "--data.shard_dir=data/shards/eurosat"],
    "sign_digits": [f"--data.root={SHARED / 'sign_digits' / 'Dataset'}", "--data.val_fraction=0.2",
                    "--data.split_seed=0", "--data.shard_dir=data/shards/sign_digits"],
    "trashnet": [f"--data.root={SHARED / 'trashnet' / 'images'}", "--data.val_fraction=0.2", "--data.split_seed=0",
                 "--data.shard_dir=data/shards/trashnet"],
}
ARMS = {"planned": [], "fixed": ["--config", "configs/finetune_lite0.yaml"],
        "fastai": ["--config", "configs/fastai_fine_tune_lite0.yaml"]}


def read_results(out: Path) -> dict:
    """Best val top-1 (raw or EMA weights, any evaluation), test top-1, steps and the plan's choices."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r[k] for r in recs for k in ("val/top1", "val_ema/top1") if k in r]
    probe = next((r.get("val/top1") for r in recs if r.get("step") == 0 and "val/top1" in r), None)
    test = next((r["test/top1"] for r in recs if "test/top1" in r), None)
    res = {"best_val": max(vals) if vals else None, "test": test, "probe_val": probe,
           "steps": max((r.get("step", 0) for r in recs), default=0)}
    plan = out / "plan.json"
    if plan.is_file():
        p = json.loads(plan.read_text())
        ov = p["overrides"]
        res["choice"] = (f"{ov.get('finetune.strategy', '')} {ov.get('data.image_size', '')}px "
                         f"{p['steps']} steps" + (f" (replanned from {p['replans'][0]['previous_steps']})"
                                                  if p["replans"] else ""))
    return res


def run_one(dataset: str, budget_min: float, arm: str, runs: Path) -> dict:
    """One command, timed whole; returns its row."""
    out = runs / dataset / f"{budget_min:g}m" / arm
    cmd = [sys.executable, "trainer/main.py", *ARMS[arm], *DATASETS[dataset], f"--train.time_budget={budget_min}m",
           f"--train.output_dir={out}", "--train.resume=false", "--train.overwrite=true", "--logging.wandb=disabled",
           "--logging.progress=false"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out.parent / f"{arm}.log").write_text(p.stdout + p.stderr)
    row = {"dataset": dataset, "budget_min": budget_min, "arm": arm, "rc": p.returncode, "wall_min": wall / 60,
           "over_budget": wall / (budget_min * 60) - 1, "load1": os.getloadavg()[0]}
    if p.returncode == 0:
        row.update(read_results(out))
    else:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Best val top-1 against budget, one panel per dataset, one line per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for arm in ARMS:
            pts = sorted((r["budget_min"], r["best_val"]) for r in rows
                         if r["dataset"] == ds and r["arm"] == arm and r.get("best_val") is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=arm)
        ax.set_title(ds)
        ax.set_xlabel("budget (min)")
        ax.set_ylabel("best val top-1")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="ants_bees,eurosat,sign_digits,trashnet")
    ap.add_argument("--budgets", default="2,5,15,30", help="minutes, comma-separated")
    ap.add_argument("--arms", default="planned,fixed,fastai")
    ap.add_argument("--runs_dir", default="runs/budget")
    ap.add_argument("--out", default=None, help="write OUT.csv (appended) and OUT.png")
    args = ap.parse_args()
    rows = []
    for ds in args.datasets.split(","):
        for b in (float(x) for x in args.budgets.split(",")):
            for arm in args.arms.split(","):
                row = run_one(ds, b, arm, Path(args.runs_dir))
                rows.append(row)
                print(" | ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    if args.out:
        path = Path(args.out).with_suffix(".csv")
        old = list(csv.DictReader(path.open())) if path.is_file() else []
        keys = ["dataset", "budget_min", "arm", "rc", "wall_min", "over_budget", "best_val", "test", "probe_val",
                "steps", "choice", "load1", "error"]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in old + rows:
                w.writerow(r)
        every = [{**r, "budget_min": float(r["budget_min"]),
                  "best_val": float(r["best_val"]) if r.get("best_val") not in (None, "") else None}
                 for r in old + rows]
        plot(every, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
