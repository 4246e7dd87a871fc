"""The whole selection: data -> per candidate (features, linear probe, cost) -> table, CSV, plot, config.

Single-label data ranks candidates by the softmax probe's val top-1; multi-label data (``dataset.json``
``"task": "multilabel"``) by the sigmoid probe's val mAP, on a subset that keeps every class
(:mod:`trainer.selection.multilabel`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from trainer.config.schema import Config, ConfigError
from trainer.data.prepare import prepare_dataset
from trainer.finetune.linear_probe import fit_linear_probe_holdout
from trainer.models.build import build_model
from trainer.selection.features import cache_path, compute_features, load_cached, save_cached
from trainer.selection.measure import measure_cost
from trainer.selection.multilabel import fit_probe_multilabel, probe_map, read_subset_multilabel
from trainer.selection.report import (
    METRICS,
    Row,
    estimate_finetune_s,
    format_table,
    plot_accuracy_vs_cost,
    recommend,
    write_chosen_config,
    write_csv,
)
from trainer.selection.subset import data_fingerprint, read_subset

log = logging.getLogger("trainer")


@dataclasses.dataclass
class SelectionOptions:
    """Options of :func:`select_backbones` (the command line's flags).

    Attributes:
        candidates: ``(backbone, weights)`` pairs (see :mod:`trainer.selection.candidates`); >= 1.
        train_subset: stratified training samples for the probe, >= 2 (whole split if larger).
        val_subset: stratified validation samples the probe is scored on, >= 1.
        seed: subset selection and probe hold-out seed.
        batch_size: images per step for features and cost (default: ``train.micro_batch_size``), >= 1.
        steps: timed steps per cost measurement, >= 1.
        epochs: epochs in the fine-tuning time estimate (default: ``train.epochs``), >= 1.
        cache_dir: feature cache folder.
        out_dir: where ``selection.csv``, ``selection.png`` and ``chosen.yaml`` go.
        time_budget_s: the recommendation's bound on estimated fine-tuning seconds (None: none), > 0.
        memory_budget_mib: bound on peak training memory in MiB (None: none), > 0.
    """

    candidates: list[tuple[str, str]]
    train_subset: int = 1000
    val_subset: int = 500
    seed: int = 0
    batch_size: int | None = None
    steps: int = 3
    epochs: int | None = None
    cache_dir: str = "data/feature_cache"
    out_dir: str = "runs/select_backbone"
    time_budget_s: float | None = None
    memory_budget_mib: float | None = None

    def check(self) -> None:
        """Raises ConfigError naming the first invalid option."""
        if not self.candidates:
            raise ConfigError("candidates: no backbone to compare (none given and none available offline)")
        for name, low in (("train_subset", 2), ("val_subset", 1), ("steps", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        for name in ("batch_size", "epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("time_budget_s", "memory_budget_mib"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"{name} must be a number > 0, got {v!r}")


@dataclasses.dataclass
class SelectionResult:
    """Rows (main process; empty on other ranks), the recommended row, written files and the :class:`Row` field
    the candidates were ranked by (``probe_top1``, or ``probe_map`` on multi-label data)."""

    rows: list[Row]
    chosen: Row | None
    files: dict[str, Path]
    metric: str = "probe_top1"


def select_backbones(cfg: Config, opts: SelectionOptions, accelerator) -> SelectionResult:
    """Compare ``opts.candidates`` on the dataset of ``cfg.data`` (any layout the trainer reads).

    Each candidate runs at ``cfg.data.image_size`` when set (the size the run would train at), else at
    its own pretraining size; features, cost and the table's ``input`` column use that size.

    Every rank reads its part of a stratified subset of the train / val shards once (only if some
    candidate's features are not cached) and computes its part of each candidate's features
    (:mod:`trainer.selection.features`, gathered once per candidate). The main process then fits the
    linear probe (:func:`trainer.finetune.linear_probe.fit_linear_probe_holdout`) on the train-subset
    features, scores it on the val subset (multi-label data: the sigmoid probe of
    :func:`trainer.selection.multilabel.fit_probe_multilabel`, scored by val mAP), measures the cost
    (:func:`trainer.selection.measure.measure_cost`) while the other ranks wait, and writes
    ``out_dir/{selection.csv, selection.png, chosen.yaml}``.

    Raises:
        ConfigError: invalid options or data configuration (named). RuntimeError / ValueError from
            model building (unknown backbone, weights not available offline).
    """
    opts.check()
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    gather = None
    if world > 1:
        from accelerate.utils import gather_object as gather
    data = prepare_dataset(cfg.data, accelerator)
    meta = data.meta
    multilabel = meta.task == "multilabel"
    metric = "probe_map" if multilabel else "probe_top1"
    read = read_subset_multilabel if multilabel else read_subset
    meta_path = cfg.data.meta or str(Path(cfg.data.shard_dir) / "dataset.json")
    fingerprint = data_fingerprint(meta_path, data.train_shards, data.val_shards)
    subset_id = {"train": opts.train_subset, "val": opts.val_subset, "seed": opts.seed}
    batch = opts.batch_size or cfg.train.micro_batch_size
    epochs = opts.epochs or cfg.train.epochs
    device = accelerator.device
    precision = accelerator.mixed_precision  # the value the accelerator computes in (resolved at start)
    samples = None  # this rank's subset, read at the first cache miss
    rows: list[Row] = []
    for backbone, weights in opts.candidates:
        t0 = time.perf_counter()
        torch.manual_seed(opts.seed)  # the head (and a randomly initialised backbone) equal on every rank
        model, prep = build_model(backbone, meta.num_classes, weights, channels_last=cfg.model.channels_last)
        if cfg.data.image_size:  # the size the run will train at, as in trainer.train.components
            prep = dataclasses.replace(prep, input_size=cfg.data.image_size)
        path = cache_path(opts.cache_dir, backbone, weights, prep, precision, fingerprint, subset_id, meta.task)
        splits = load_cached(path, meta.task) if main else None
        hit = [splits is not None]
        if world > 1:  # the main process decides: every rank computes, or none does
            from accelerate.utils import broadcast_object_list
            hit = broadcast_object_list(hit)
        if not hit[0]:
            if samples is None:
                samples, skipped = {}, []
                for split, shards, size in (("train", data.train_shards, opts.train_subset),
                                            ("val", data.val_shards, opts.val_subset)):
                    counts = meta.splits[split].class_counts
                    samples[split], bad = read(shards, counts, size, seed=opts.seed, rank=rank,
                                               world_size=world, gather_object=gather)
                    skipped += bad
            model = model.to(device, memory_format=model.memory_format).eval()
            splits, bad = compute_features(model, prep, samples, num_classes=meta.num_classes, batch_size=batch,
                                           device=device, autocast=accelerator.autocast, gather_object=gather,
                                           multilabel=multilabel)
            if main:
                save_cached(path, splits, meta.task)
                if bad:
                    log.warning("%s: %d undecodable sample(s) left out, e.g. %s", backbone, len(bad), bad[:3])
        del model
        feat_s = time.perf_counter() - t0
        if main:
            if multilabel:
                tr = splits["train"]
                probe = fit_probe_multilabel(tr.x, tr.y, tr.keys, seed=opts.seed)
                top1, score = math.nan, probe_map(probe, splits["val"].x, splits["val"].y)
            else:
                probe = fit_linear_probe_holdout(splits["train"].x, splits["train"].y, meta.num_classes,
                                                 seed=opts.seed)
                top1 = score = probe.top1(splits["val"].x, splits["val"].y)
            cost = measure_cost(backbone, weights, num_classes=meta.num_classes, batch_size=batch, device=device,
                                autocast=accelerator.autocast, channels_last=cfg.model.channels_last,
                                steps=opts.steps, input_size=prep.input_size)
            scale = world if device.type == "cuda" else 1  # CPU ranks share the cores measured here
            est = estimate_finetune_s(data.num_train_samples, data.num_val_samples, epochs,
                                      cost.train_img_s, cost.infer_img_s, scale)
            rows.append(Row(backbone, weights, prep.input_size, top1, len(splits["train"].y),
                            len(splits["val"].y), cost.params_m, cost.gflops, cost.train_img_s, cost.infer_img_s,
                            cost.peak_train_mem_mib, est, bool(hit[0]), probe.l2,
                            score if multilabel else math.nan))
            log.info("%s: probe %s %.3f (features %s, %.0f s; total %.0f s)", backbone,
                     "val mAP" if multilabel else "top-1", score, "cached" if hit[0] else "computed", feat_s,
                     time.perf_counter() - t0)
        accelerator.wait_for_everyone()
    if not main:
        return SelectionResult([], None, {}, metric)
    chosen = recommend(rows, time_budget_s=opts.time_budget_s, memory_budget_mib=opts.memory_budget_mib,
                       metric=metric)
    out = Path(opts.out_dir)
    files = {"csv": write_csv(rows, out / "selection.csv", metric)}
    kind = "multi-label classes" if multilabel else "classes"
    title = (f"{cfg.name}: {meta.num_classes} {kind}, probe on {rows[0].probe_train_n} train / "
             f"{rows[0].probe_val_n} val images; {epochs} epochs of {data.num_train_samples} images, "
             f"batch {batch}, precision {precision}")
    files["png"] = plot_accuracy_vs_cost(rows, out / "selection.png", title=title, chosen=chosen, metric=metric)
    if chosen is not None:
        files["config"] = write_chosen_config(cfg, chosen, out / "chosen.yaml")
    return SelectionResult(rows, chosen, files, metric)


def summary(result: SelectionResult, opts: SelectionOptions) -> str:
    """The table, the recommendation (or why there is none) and the files, as printed by the CLI."""
    metric = result.metric
    lines = [format_table(result.rows, metric), ""]
    budget = ", ".join(s for s in (
        f"time <= {opts.time_budget_s:g} s" if opts.time_budget_s else "",
        f"memory <= {opts.memory_budget_mib:g} MiB" if opts.memory_budget_mib else "") if s) or "no budget"
    if result.chosen is None:
        lines.append(f"recommendation ({budget}): none of the candidates fits")
    else:
        c = result.chosen
        name = "top-1" if metric == "probe_top1" else METRICS[metric]
        lines.append(f"recommendation ({budget}): {c.backbone} (weights {c.weights}): probe {name} "
                     f"{getattr(c, metric):.3f}, est. fine-tuning {c.est_finetune_s:.0f} s, "
                     f"peak training memory {c.peak_train_mem_mib:.0f} MiB")
    lines += [f"{k}: {v}" for k, v in result.files.items()]
    return "\n".join(lines) + ("" if all(math.isfinite(getattr(r, metric)) for r in result.rows) else
                               "\n(nan: probe not fitted)")
