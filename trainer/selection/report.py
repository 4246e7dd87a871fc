"""Results of backbone selection: rows, table, CSV, accuracy-against-cost plot, recommendation, config.

The score a candidate is ranked by (``metric``, a :class:`Row` field) is the linear probe's val top-1
(``probe_top1``, single-label data, the default everywhere) or its val macro mAP (``probe_map``, ``data.task:
multilabel``); the table, CSV and plot then show that column in place of ``probe_top1`` (:data:`METRICS`)."""

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
from trainer.files.atomic import atomic_write


@dataclasses.dataclass
class Row:
    """One candidate's figures (units in the field names; NaN when not measured). ``probe_top1``: the probe's
    val top-1 (NaN on multi-label data); ``probe_map``: its val macro mAP (multi-label data only, else NaN)."""

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
    probe_map: float = math.nan


METRICS = {"probe_top1": "val top-1", "probe_map": "val mAP"}
"""Scores a candidate can be ranked by (a :class:`Row` field) -> how the summary and the plot name them."""
COLUMNS = [f.name for f in dataclasses.fields(Row) if f.name != "probe_map"]
"""CSV columns of a single-label selection; multi-label: :func:`columns` (``probe_map`` for ``probe_top1``)."""
_SHOW = [("backbone", "{}"), ("input_px", "{}"), ("probe_top1", "{:.3f}"), ("params_m", "{:.1f}"),
         ("gflops", "{:.2f}"), ("train_img_s", "{:.1f}"), ("infer_img_s", "{:.1f}"),
         ("peak_train_mem_mib", "{:.0f}"), ("est_finetune_s", "{:.0f}"), ("features_cached", "{}")]


def columns(metric: str = "probe_top1") -> list[str]:
    """The CSV columns when ranking by ``metric`` (a key of :data:`METRICS`): :data:`COLUMNS` with
    ``probe_top1`` replaced by ``metric``. Raises ValueError for an unknown metric."""
    if metric not in METRICS:
        raise ValueError(f"unknown selection metric {metric!r} (one of {list(METRICS)})")
    return [metric if c == "probe_top1" else c for c in COLUMNS]


def estimate_finetune_s(num_train: int, num_val: int, epochs: int, train_img_s: float, infer_img_s: float,
                        world_size: int = 1) -> float:
    """Seconds for ``epochs`` of full fine-tuning plus one validation pass per epoch at these rates.

    ``epochs * (num_train / train_img_s + num_val / infer_img_s) / world_size``: compute only (data
    loading assumed to keep up; rates are per process, so linear scaling over ranks is assumed).
    """
    return epochs * (num_train / train_img_s + num_val / infer_img_s) / world_size


def format_table(rows: list[Row], metric: str = "probe_top1") -> str:
    """Fixed-width text table of the main columns (one line per candidate, header first); the score column is
    ``metric`` (``probe_top1`` or ``probe_map``)."""
    show = [(metric if name == "probe_top1" else name, fmt) for name, fmt in _SHOW]
    cells = [[name for name, _ in show]] + [[fmt.format(getattr(r, name)) for name, fmt in show] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(show))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(c)))
                     for c in cells)


def write_csv(rows: list[Row], path: str | Path, metric: str = "probe_top1") -> Path:
    """The :func:`columns` of ``metric`` (single-label: all :data:`COLUMNS`), one row per candidate (written
    atomically)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns(metric), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(dataclasses.asdict(r))
    return atomic_write(path, buf.getvalue())


def pareto_front(rows: list[Row], cost: str = "est_finetune_s", metric: str = "probe_top1") -> list[Row]:
    """Rows no other row beats on both ``cost`` (lower) and ``metric`` (higher), by cost ascending."""
    def m(r: Row) -> float:
        return getattr(r, metric)

    ok = [r for r in rows if not (math.isnan(getattr(r, cost)) or math.isnan(m(r)))]
    front = [r for r in ok if not any(
        getattr(o, cost) <= getattr(r, cost) and m(o) >= m(r)
        and (getattr(o, cost) < getattr(r, cost) or m(o) > m(r)) for o in ok)]
    return sorted(front, key=lambda r: getattr(r, cost))


def ranking(rows: list[Row], metric: str = "probe_top1") -> list[Row]:
    """Rows with a score, best first: ``metric`` descending (ties: the lower ``est_finetune_s``, then the
    earlier row); rows whose ``metric`` is NaN are left out."""
    return sorted((r for r in rows if not math.isnan(getattr(r, metric))),
                  key=lambda r: (-getattr(r, metric), r.est_finetune_s))


def recommend(rows: list[Row], *, time_budget_s: float | None = None,
              memory_budget_mib: float | None = None, metric: str = "probe_top1") -> Row | None:
    """Highest ``metric`` (probe val top-1, or val mAP on multi-label data) among rows within the budgets
    (ties: the cheaper); None if none fits.

    Args:
        time_budget_s: upper bound on ``est_finetune_s`` (None: no bound).
        memory_budget_mib: upper bound on ``peak_train_mem_mib`` (None: no bound).
        metric: the :class:`Row` field ranked by (:data:`METRICS`).
    """
    fit = [r for r in rows if not math.isnan(getattr(r, metric))
           and (time_budget_s is None or r.est_finetune_s <= time_budget_s)
           and (memory_budget_mib is None or r.peak_train_mem_mib <= memory_budget_mib)]
    return max(fit, key=lambda r: (getattr(r, metric), -r.est_finetune_s)) if fit else None


def plot_accuracy_vs_cost(rows: list[Row], path: str | Path, *, title: str = "",
                          chosen: Row | None = None, metric: str = "probe_top1") -> Path:
    """Scatter of the probe's ``metric`` (val top-1, or val mAP) against estimated fine-tuning time (log x),
    Pareto front joined and ringed, the recommended backbone starred. matplotlib OO API (Agg canvas)."""
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    front = pareto_front(rows, metric=metric)
    ax.scatter([r.est_finetune_s for r in rows], [getattr(r, metric) for r in rows], s=40, color="tab:blue",
               zorder=3, label="candidate")
    if front:
        ax.plot([r.est_finetune_s for r in front], [getattr(r, metric) for r in front], "-", color="tab:orange",
                zorder=2, label="Pareto front")
        ax.scatter([r.est_finetune_s for r in front], [getattr(r, metric) for r in front], s=140,
                   facecolors="none", edgecolors="tab:orange", linewidths=1.5, zorder=4)
    if chosen is not None:
        ax.scatter([chosen.est_finetune_s], [getattr(chosen, metric)], marker="*", s=260, color="tab:red",
                   zorder=5, label="recommended")
    for i, r in enumerate(sorted(rows, key=lambda r: r.est_finetune_s)):  # labels alternate below / above
        ax.annotate(f"{r.backbone.split(':')[-1]}\n{r.gflops:.2f} GFLOPs, {r.peak_train_mem_mib:.0f} MiB",
                    (r.est_finetune_s, getattr(r, metric)), textcoords="offset points",
                    xytext=(6, -24 if i % 2 == 0 else 8), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("estimated full fine-tuning time on this machine (s, log scale)")
    ax.set_ylabel(f"linear-probe {METRICS[metric]}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ys = [getattr(r, metric) for r in rows if not math.isnan(getattr(r, metric))]
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
    ``--config``). The run directory becomes ``<base output_dir>_<backbone>`` so runs do not collide. Every
    other field is the run's own: ``data.task: multilabel`` and the ``data.*`` label fields of a multi-label
    source (``label_column``, ``label_delimiter``, ``label_columns``, ``label_map``) included."""
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, backbone=row.backbone,
                                                              weights=row.weights))
    tag = row.backbone.split(":")[-1].replace(".", "_")
    cfg = dataclasses.replace(cfg, name=f"{base.name}_{tag}",
                              train=dataclasses.replace(base.train, output_dir=f"{base.train.output_dir}_{tag}"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return path
