"""Benchmark: five transfer-learning strategies on the ants/bees images, one table and one plot.

Each strategy is a config (the shipped YAML files plus a few overrides), trained in this process
with :func:`trainer.train.trainer.run` (single process) into ``<runs_dir>/<strategy>``; the figures are read
back from each run's ``metrics.jsonl``:

==================  ============================================================================
scratch             EfficientNet-Lite0 from random weights (``model.weights=none``), all layers train
feature_extraction  pretrained backbone frozen, only the new head trains (configs/ants_bees_lite0.yaml)
full_finetune       pretrained, every layer trains from epoch 0 at lr 3e-4 (``finetune.freeze=none``)
last_stages         head for 2 epochs, then the top 2 stages at 0.03x lr, then all at 0.01x, BatchNorm
                    statistics kept (configs/ants_bees_lite0_partial.yaml)
gradual             gradual unfreezing (one stage per epoch from epoch 1) at 0.02x lr with layer_decay
                    0.6, BatchNorm statistics kept (configs/ants_bees_lite0_gradual.yaml)
==================  ============================================================================

Every strategy runs the same number of epochs (``--epochs``, default 4) with the same global batch
(16), seed and data. Columns: val top-1 after each epoch, seconds per epoch (training + evaluation,
wall clock), training images/s (mean over epochs, from ``train/images_per_s``).

Usage::

    python bench/strategies.py                        # all five, 4 epochs, writes docs/strategies.png
    python bench/strategies.py --only gradual,scratch --epochs 3

Runs about 15 minutes on 2 idle CPU cores (much longer when they are shared: seconds and images/s
are wall-clock figures of this machine at that moment). W&B is disabled; the run folders are replaced
on every call; the table, ``results.json`` and the plot are rewritten after each strategy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config.loading import load_config  # noqa: E402

# strategy -> (config file, overrides)
STRATEGIES: dict[str, tuple[str, dict]] = {
    "feature_extraction": ("configs/ants_bees_lite0.yaml", {}),
    "gradual": ("configs/ants_bees_lite0_gradual.yaml", {}),
    "last_stages": ("configs/ants_bees_lite0_partial.yaml", {}),
    "full_finetune": ("configs/ants_bees_lite0.yaml", {"finetune.freeze": "none", "optim.lr": 3e-4}),
    "scratch": ("configs/ants_bees_lite0.yaml", {"model.weights": "none", "finetune.freeze": "none"}),
}


def run_strategy(name: str, epochs: int, runs_dir: Path) -> dict:
    """Train strategy ``name`` for ``epochs`` epochs in this process and summarise its metrics.

    Returns:
        ``{"strategy", "top1": [val top-1 after each epoch], "sec_per_epoch": [s], "images_per_s": [img/s],
        "best_top1"}``; times are wall-clock seconds (training + evaluation of one epoch).

    Raises:
        KeyError: unknown strategy. Errors of :func:`trainer.train.trainer.run`.
    """
    from trainer.train.trainer import run

    path, overrides = STRATEGIES[name]
    out = runs_dir / name
    if out.exists():
        shutil.rmtree(out)
    cfg = load_config(REPO / path, {**overrides, "train.epochs": epochs, "train.output_dir": str(out),
                                    "logging.wandb": "disabled", "logging.progress": False,
                                    "name": f"bench_{name}"})
    if not Path(cfg.data.root).is_absolute():  # config paths are relative to the repository root
        cfg.data.root = str(REPO / cfg.data.root)
        cfg.data.shard_dir = str(REPO / cfg.data.shard_dir)
    t_start = time.time()
    res = run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/top1" in r]
    ends = [t_start] + [r["time"] for r in evals]
    ips: dict[int, float] = {}
    for r in rows:  # the last train record of an epoch measures the whole epoch's training
        if "train/images_per_s" in r:
            ips[r["epoch"]] = r["train/images_per_s"]
    return {"strategy": name, "top1": [r["val/top1"] for r in evals],
            "sec_per_epoch": [b - a for a, b in zip(ends, ends[1:])],
            "images_per_s": [ips[e] for e in sorted(ips)], "best_top1": res.best_top1}


def format_table(results: list[dict]) -> str:
    """Markdown table: strategy, val top-1 per epoch, best, s/epoch (mean), train images/s (mean)."""
    n = max(len(r["top1"]) for r in results)
    head = ["strategy"] + [f"ep{i + 1}" for i in range(n)] + ["best", "s/epoch", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in results:
        top = [f"{t:.3f}" for t in r["top1"]] + [""] * (n - len(r["top1"]))
        sec = sum(r["sec_per_epoch"]) / len(r["sec_per_epoch"])
        ips = sum(r["images_per_s"]) / len(r["images_per_s"])
        lines.append("| " + " | ".join([r["strategy"]] + top + [f"{max(r['top1']):.3f}", f"{sec:.1f}",
                                                                  f"{ips:.1f}"]) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Val top-1 per epoch (left) and training images/s (right) per strategy, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for r in results:
        ax1.plot(range(1, len(r["top1"]) + 1), r["top1"], marker="o", label=r["strategy"])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("val top-1")
    ax1.set_title("ants/bees, EfficientNet-Lite0, global batch 16")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right")
    names = [r["strategy"] for r in results]
    ips = [sum(r["images_per_s"]) / len(r["images_per_s"]) for r in results]
    ax2.barh(names, ips, color=[f"C{i}" for i in range(len(results))])
    ax2.invert_yaxis()
    ax2.set_xlabel("training images/s (CPU)")
    ax2.set_title("throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: see the module docstring. Prints the table and writes the plot and a JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs per strategy (default 4)")
    ap.add_argument("--only", default=",".join(STRATEGIES), help="comma-separated strategies")
    ap.add_argument("--runs_dir", default="runs/bench_strategies", help="run folders (replaced)")
    ap.add_argument("--plot", default="docs/strategies.png", help="PNG path")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        ap.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    runs_dir = Path(args.runs_dir)
    results = []
    for n in names:  # table, JSON and plot are rewritten after every strategy (partial results survive)
        results.append(run_strategy(n, args.epochs, runs_dir))
        table = format_table(results)
        print(table, flush=True)
        (runs_dir / "results.json").write_text(json.dumps(results, indent=1))
        (runs_dir / "table.md").write_text(table + "\n")
        plot(results, Path(args.plot))
    print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
