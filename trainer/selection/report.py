"""Results of backbone selection: rows, table, CSV, accuracy-against-cost plot, recommendation, config."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from trainer.config.loading import save_config
from trainer.config.schema import Config
from trainer.reporting.plots import save_png
from trainer.utils.files import atomic_write


@dataclasses.dataclass
class Row:
    """One candidate's figures (units in the field names; NaN when not measured)."""

    backbone: str
    weights: str
    input_px: int
    probe_top1: float
    probe_train_n: int
    probe_val_n: int
    params_m: float
    gflops: float
    train_img_s: float
    infer_img_s: float
    peak_train_mem_mib: float
    est_finetune_s: float
    features_cached: bool
    probe_l2: float = math.nan


COLUMNS = [f.name for f in dataclasses.fields(Row)]
_SHOW = [("backbone", "{}"), ("input_px", "{}"), ("probe_top1", "{:.3f}"), ("params_m", "{:.1f}"),
         ("gflops", "{:.2f}"), ("train_img_s", "{:.1f}"), ("infer_img_s", "{:.1f}"),
         ("peak_train_mem_mib", "{:.0f}"), ("est_finetune_s", "{:.0f}"), ("features_cached", "{}")]


def estimate_finetune_s(num_train: int, num_val: int, epochs: int, train_img_s: float, infer_img_s: float,
                        world_size: int = 1) -> float:
    """Seconds for ``epochs`` of full fine-tuning plus one validation pass per epoch at these rates.

    ``epochs * (num_train / train_img_s + num_val / infer_img_s) / world_size``: compute only (data
    loading assumed to keep up; rates are per process, so linear scaling over ranks is assumed).
    """
    return epochs * (num_train / train_img_s + num_val / infer_img_s) / world_size


def format_table(rows: list[Row]) -> str:
    """Fixed-width text table of the main columns (one line per candidate, header first)."""
    cells = [[name for name, _ in _SHOW]] + [[fmt.format(getattr(r, name)) for name, fmt in _SHOW] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_SHOW))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(c)))
                     for c in cells)


def write_csv(rows: list[Row], path: str | Path) -> Path:
    """All :data:`COLUMNS`, one row per candidate (written atomically)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow(dataclasses.asdict(r))
    return atomic_write(path, buf.getvalue())


def pareto_front(rows: list[Row], cost: str = "est_finetune_s") -> list[Row]:
    """Rows no other row beats on both ``cost`` (lower) and ``probe_top1`` (higher), by cost ascending."""
    ok = [r for r in rows if not (math.isnan(getattr(r, cost)) or math.isnan(r.probe_top1))]
    front = [r for r in ok if not any(
        getattr(o, cost) <= getattr(r, cost) and o.probe_top1 >= r.probe_top1
        and (getattr(o, cost) < getattr(r, cost) or o.probe_top1 > r.probe_top1) for o in ok)]
    return sorted(front, key=lambda r: getattr(r, cost))


def recommend(rows: list[Row], *, time_budget_s: float | None = None,
              memory_budget_mib: float | None = None) -> Row | None:
    """Highest probe top-1 among rows within the budgets (ties: the cheaper); None if none fits.

    Args:
        time_budget_s: upper bound on ``est_finetune_s`` (None: no bound).
        memory_budget_mib: upper bound on ``peak_train_mem_mib`` (None: no bound).
    """
    fit = [r for r in rows if not math.isnan(r.probe_top1)
           and (time_budget_s is None or r.est_finetune_s <= time_budget_s)
           and (memory_budget_mib is None or r.peak_train_mem_mib <= memory_budget_mib)]
    return max(fit, key=lambda r: (r.probe_top1, -r.est_finetune_s)) if fit else None


def plot_accuracy_vs_cost(rows: list[Row], path: str | Path, *, title: str = "",
                          chosen: Row | None = None) -> Path:
    """Scatter of probe top-1 against estimated fine-tuning time (log x), Pareto front joined and
    ringed, the recommended backbone starred. matplotlib OO API (Agg canvas)."""
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    front = pareto_front(rows)
    ax.scatter([r.est_finetune_s for r in rows], [r.probe_top1 for r in rows], s=40, color="tab:blue",
               zorder=3, label="candidate")
    if front:
        ax.plot([r.est_finetune_s for r in front], [r.probe_top1 for r in front], "-", color="tab:orange",
                zorder=2, label="Pareto front")
        ax.scatter([r.est_finetune_s for r in front], [r.probe_top1 for r in front], s=140,
                   facecolors="none", edgecolors="tab:orange", linewidths=1.5, zorder=4)
    if chosen is not None:
        ax.scatter([chosen.est_finetune_s], [chosen.probe_top1], marker="*", s=260, color="tab:red",
                   zorder=5, label="recommended")
    for i, r in enumerate(sorted(rows, key=lambda r: r.est_finetune_s)):  # labels alternate below / above
        ax.annotate(f"{r.backbone.split(':')[-1]}\n{r.gflops:.2f} GFLOPs, {r.peak_train_mem_mib:.0f} MiB",
                    (r.est_finetune_s, r.probe_top1), textcoords="offset points",
                    xytext=(6, -24 if i % 2 == 0 else 8), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("estimated full fine-tuning time on this machine (s, log scale)")
    ax.set_ylabel("linear-probe val top-1")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ys = [r.probe_top1 for r in rows if not math.isnan(r.probe_top1)]
    if ys:
        ax.set_ylim(min(ys) - 0.05, min(1.0, max(ys) + 0.03) + 0.01)
    xs = [r.est_finetune_s for r in rows if r.est_finetune_s > 0]
    if xs:
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.5)
    if title:
        ax.set_title(title, fontsize=10)
    return save_png(fig, path)


def write_chosen_config(base: Config, row: Row, path: str | Path) -> Path:
    """The run's config with ``model.backbone`` / ``model.weights`` of ``row`` (loadable with
    ``--config``). The run directory becomes ``<base output_dir>_<backbone>`` so runs do not collide."""
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, backbone=row.backbone,
                                                              weights=row.weights))
    tag = row.backbone.split(":")[-1].replace(".", "_")
    cfg = dataclasses.replace(cfg, name=f"{base.name}_{tag}",
                              train=dataclasses.replace(base.train, output_dir=f"{base.train.output_dir}_{tag}"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return path
