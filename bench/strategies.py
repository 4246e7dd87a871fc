"""Benchmark: transfer-learning strategies on one dataset, accuracy and wall time side by side.

Each strategy is a shipped config (``configs/<dataset>_lite0*.yaml``, optionally with a few overrides),
trained in this process with :func:`trainer.train.start.run` (single process) into
``<runs_dir>/<dataset>/<strategy>``; the figures are read back from each run's ``metrics.jsonl``:

==================  ============================================================================
linear_probe        frozen backbone, features computed once, L-BFGS logistic regression with the L2
                    strength chosen on val (``finetune.strategy: linear_probe``; ``*_linear_probe.yaml``)
feature_extraction  frozen backbone, the head trained by AdamW for the config's epochs (``*_lite0.yaml``)
finetune            the fine-tuning recipe: every layer trains (``*_finetune.yaml``)
lp_ft               linear probe, then the fine-tuning recipe from that head (Kumar et al. 2022;
                    ``*_lp_ft.yaml``)
full_finetune       the textbook baseline (only with ``--only``): ``*_lite0.yaml`` with ``finetune.freeze=none``,
                    lr 3e-4, BatchNorm statistics updated, no layer_decay
gradual             gradual unfreezing (``ants_bees_lite0_gradual.yaml``; ants/bees only)
last_stages         explicit unfreeze timetable (``ants_bees_lite0_partial.yaml``; ants/bees only)
scratch             the fine-tuning recipe from random weights (``model.weights=none``, no EMA, no L2-SP),
                    same epochs
==================  ============================================================================

Columns: val top-1 after each epoch (the linear probe has one evaluation), best val top-1, test top-1
of ``best.pt`` when the data has a test split (``test/top1``), wall-clock minutes of the whole run
(set-up, feature extraction, training, evaluation), and the 1-minute load average at the end
(this machine's 2 cores are shared: a load above 2 means other jobs took CPU time from the run).

Usage::

    python bench/strategies.py --dataset ants_bees                 # every strategy of ants/bees
    python bench/strategies.py --dataset eurosat --only linear_probe,finetune
    python bench/strategies.py --dataset ants_bees --only finetune,scratch --epochs 3
    python bench/strategies.py --dataset eurosat --only finetune,scratch --epochs 2 --set data.image_size=64

W&B is disabled; run folders are replaced on every call; the table, ``results.json`` and the plot
(``docs/strategies.png`` for ants/bees, ``docs/strategies_<dataset>.png`` otherwise) are rewritten
after each strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from trainer.config.loading import load_config, yaml_load  # noqa: E402

# strategy -> (config file relative to configs/ with {d} = dataset, overrides)
STRATEGIES: dict[str, tuple[str, dict]] = {
    "linear_probe": ("{d}_lite0_linear_probe.yaml", {}),
    "feature_extraction": ("{d}_lite0.yaml", {}),
    "finetune": ("{d}_lite0_finetune.yaml", {}),
    "lp_ft": ("{d}_lite0_lp_ft.yaml", {}),
    "full_finetune": ("{d}_lite0.yaml", {"finetune.freeze": "none", "optim.lr": 3e-4}),
    "gradual": ("{d}_lite0_gradual.yaml", {}),
    "last_stages": ("{d}_lite0_partial.yaml", {}),
    "scratch": ("{d}_lite0_finetune.yaml", {"model.weights": "none", "train.ema_decay": None,
                                            "finetune.l2_sp": None}),  # no pretrained weights to pull toward
}
DATASETS = ("ants_bees", "eurosat")
BASELINES = ("full_finetune",)
"""Not recipes (run only when named in ``--only``): what the recipes are measured against."""


def available(dataset: str) -> list[str]:
    """Strategies whose config file exists for ``dataset``."""
    return [n for n, (f, _) in STRATEGIES.items() if (REPO / "configs" / f.format(d=dataset)).is_file()]


def run_strategy(name: str, dataset: str, epochs: int | None, runs_dir: Path, extra: dict | None = None) -> dict:
    """Train strategy ``name`` on ``dataset`` in this process and summarise its metrics.

    Args:
        epochs: override ``train.epochs`` (None: the config's own).
        extra: further ``section.key`` overrides (e.g. ``{"data.image_size": 128}``).

    Returns:
        ``{"strategy", "top1": [val top-1 per evaluation], "best_top1", "test_top1" (or None),
        "minutes" (wall clock, whole run), "load_avg" (1-min load average at the end)}``.

    Raises:
        KeyError: unknown strategy. Errors of :func:`trainer.train.start.run`.
    """
    from trainer.train.start import run

    path, overrides = STRATEGIES[name]
    out = runs_dir / dataset / name
    if out.exists():
        shutil.rmtree(out)
    ov = {**overrides, **(extra or {}), "train.output_dir": str(out), "logging.wandb": "disabled",
          "logging.progress": False, "name": f"bench_{dataset}_{name}"}
    if epochs is not None:
        ov["train.epochs"] = epochs
    cwd = os.getcwd()
    os.chdir(REPO)  # config paths (data, shards) are relative to the repository root
    try:
        cfg = load_config(Path("configs") / path.format(d=dataset), ov)
        t_start = time.time()
        res = run(cfg)
        minutes = (time.time() - t_start) / 60
    finally:
        os.chdir(cwd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/top1" in r]
    tests = [r["test/top1"] for r in rows if "test/top1" in r]
    return {"strategy": name, "top1": [r["val/top1"] for r in evals], "best_top1": res.best_top1,
            "test_top1": tests[-1] if tests else None, "minutes": minutes, "load_avg": os.getloadavg()[0]}


def format_table(results: list[dict]) -> str:
    """Markdown table: strategy, val top-1 per evaluation, best val, test, minutes, load average."""
    n = max(len(r["top1"]) for r in results)
    head = ["strategy"] + [f"ep{i + 1}" for i in range(n)] + ["best val", "test", "minutes", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in results:
        top = [f"{t:.3f}" for t in r["top1"]] + [""] * (n - len(r["top1"]))
        test = "" if r["test_top1"] is None else f"{r['test_top1']:.4f}"
        lines.append("| " + " | ".join([r["strategy"]] + top + [f"{r['best_top1']:.4f}", test,
                                                                  f"{r['minutes']:.1f}", f"{r['load_avg']:.1f}"]) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, dataset: str) -> None:
    """Val top-1 per evaluation (left) and wall-clock minutes (right) per strategy, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for r in results:
        ax1.plot(range(1, len(r["top1"]) + 1), r["top1"], marker="o", label=r["strategy"])
    ax1.set_xlabel("epoch (linear probe: one solve)")
    ax1.set_ylabel("val top-1")
    ax1.set_title(f"{dataset}, EfficientNet-Lite0")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right")
    names = [r["strategy"] for r in results]
    ax2.barh(names, [r["minutes"] for r in results], color=[f"C{i}" for i in range(len(results))])
    ax2.invert_yaxis()
    ax2.set_xlabel("wall-clock minutes (shared 2-core CPU)")
    ax2.set_title("time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: see the module docstring. Prints the table and writes the plot and a JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="ants_bees", choices=DATASETS, help="configs/<dataset>_lite0*.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="override every config's train.epochs")
    ap.add_argument("--only", default=None, help="comma-separated strategies (default: all with a config, "
                                                 "baselines excluded)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override for every strategy (YAML value), repeatable, e.g. --set data.image_size=64")
    ap.add_argument("--runs_dir", default="runs/bench_strategies", help="run folders (replaced)")
    ap.add_argument("--plot", default=None, help="PNG path (default docs/strategies.png for ants_bees, "
                                                 "docs/strategies_<dataset>.png otherwise)")
    args = ap.parse_args(argv)
    default = [n for n in available(args.dataset) if n not in BASELINES]
    names = [s.strip() for s in (args.only or ",".join(default)).split(",") if s.strip()]
    unknown = sorted(set(names) - set(available(args.dataset)))
    if unknown:
        ap.error(f"unknown strategies for {args.dataset}: {unknown}; choose from {available(args.dataset)}")
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            ap.error(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        extra[key] = yaml_load(value)
    runs_dir = Path(args.runs_dir)
    plot_path = Path(args.plot or ("docs/strategies.png" if args.dataset == "ants_bees"
                                   else f"docs/strategies_{args.dataset}.png"))
    results = []
    for n in names:  # table, JSON and plot are rewritten after every strategy (partial results survive)
        results.append(run_strategy(n, args.dataset, args.epochs, runs_dir, extra))
        table = format_table(results)
        print(table, flush=True)
        (runs_dir / args.dataset / "results.json").write_text(json.dumps(results, indent=1))
        (runs_dir / args.dataset / "table.md").write_text(table + "\n")
        plot(results, plot_path, args.dataset)
    print(f"plot: {plot_path}")
    return results


if __name__ == "__main__":
    main()
