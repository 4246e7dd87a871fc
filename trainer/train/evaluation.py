"""Evaluate a trained model or checkpoint on a split's shards: metrics, per-class accuracy, confusion, reports.

Used at the end of a run (``checkpoints/best/`` on the test split, once: :func:`test_best_checkpoint`) and by
``launch/evaluate.py`` (:func:`evaluate_checkpoint`, any checkpoint and split); during training the
validation split with the raw and EMA weights (:func:`validate`). Every rank must call
these functions (the metrics end in one all-reduce; each sample is read by exactly one rank).

Multi-label runs (``data.task: multilabel``) evaluate with
:class:`trainer.reporting.multilabel_eval.MultiLabelAccumulator`: ``val/mAP``, ``val/mAP_micro``, ``val/f1_micro``,
``val/f1_macro``, ``val/exact_set_accuracy``, ``val/hamming_loss``, ``val/loss`` at per-class thresholds chosen on
the validation split (saved as ``thresholds`` in ``checkpoints/best/model.json``), and ``reports/val_per_class.csv``
with per-class AP, F1, support, threshold and false-positive / false-negative counts; for the best model also
``reports/val_{ap_per_class,pr_curves,mistakes}.png`` (:mod:`trainer.reporting.multilabel_plots`). A checkpoint is
evaluated (``test/...``, ``launch/evaluate.py``) at its saved thresholds (0.5 where it has none), with the same
``<split>_*`` reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data.loader import EvalLoader
from trainer.data.transforms import build_transforms
from trainer.reporting.metrics import EvalResult
from trainer.reporting.multilabel_eval import MultiLabelResult
from trainer.reporting.reporter import Reporter
from trainer.train.loop import evaluate
from trainer.files.atomic import atomic_write

log = logging.getLogger("trainer")


def evaluate_model(model: torch.nn.Module, pre, shards: Sequence[str], *, class_names: Sequence[str], accelerator,
                   micro_batch_size: int = 64, num_workers: int = 2, bad_samples: str = "skip",
                   on_batch=None, multilabel: bool = False, thresholds=None) -> EvalResult | MultiLabelResult:
    """Evaluate ``model`` (plain, unwrapped; it normalises its uint8 input itself) on every sample of
    ``shards`` with its eval transform.

    Args:
        pre: the model's :class:`trainer.models.classifier.Preprocessing` (input size, crop, interpolation).
        shards: shard paths/URLs (see :func:`trainer.data.sources.resolve_shards`).
        on_batch: optional ``(batch, logits (B, C) float32 CPU) -> None`` (e.g. a PredictionCollector).
        multilabel, thresholds: multi-label evaluation at these ``(C,)`` thresholds (None: chosen on this data),
            see :func:`trainer.train.loop.evaluate`.

    Returns:
        :class:`EvalResult` over all ranks (loss = mean cross-entropy, top1 in [0, 1], per-class counts);
        multi-label: :class:`MultiLabelResult`.
    """
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    loader = EvalLoader(list(shards), rank=accelerator.process_index, world_size=accelerator.num_processes,
                        micro_batch_size=micro_batch_size, num_workers=num_workers, transform=tf,
                        bad_samples=bad_samples, num_classes=len(class_names),
                        pin_memory=accelerator.device.type == "cuda",
                        task="multilabel" if multilabel else "multiclass")
    result = evaluate(model, iter(loader), num_classes=len(class_names), accelerator=accelerator,
                      on_batch=on_batch, multilabel=multilabel, thresholds=thresholds)
    if loader.last_skipped:
        log.warning("evaluation skipped %d bad sample(s) on rank %d, e.g. %s", len(loader.last_skipped),
                    accelerator.process_index, loader.last_skipped[:3])
    return result


def evaluate_checkpoint(checkpoint: str | Path, shards: Sequence[str], *, accelerator, split: str = "test",
                        out_dir: str | Path | None = None, tracker=None, step: int = 0,
                        micro_batch_size: int = 64, num_workers: int = 2,
                        thresholds: float | Sequence[float] | None = None
                        ) -> tuple[EvalResult | MultiLabelResult, dict]:
    """Load an inference checkpoint (``checkpoints/best/``, see :mod:`trainer.checkpoint.inference`) and
    evaluate it on ``shards``.

    Args:
        split: name used in metric keys (``<split>/top1``...) and report files (``<split>_...``).
        out_dir: if set, the main process writes into ``out_dir/reports/``: ``<split>_per_class.csv``
            (support, precision, recall = per-class accuracy, F1), ``<split>_confused_pairs.csv`` (the
            confusion matrix, sparse), ``<split>_{confusion_matrix,per_class_accuracy,mistakes}.png``,
            ``<split>_predictions.csv`` and ``<split>_metrics.json``.
        tracker: a :class:`trainer.reporting.tracking.Tracker` to log the metrics and images to (main process).
        thresholds: multi-label checkpoints: one threshold for all classes or one per class, replacing the saved
            ones (default: the checkpoint's ``thresholds``, else 0.5). Multi-label reports: ``<split>_per_class.csv``
            (:func:`trainer.reporting.multilabel_eval.write_per_class_csv`), ``<split>_ap_per_class.png``,
            ``<split>_pr_curves.png``, ``<split>_mistakes.png`` (:mod:`trainer.reporting.multilabel_plots`) and
            ``<split>_metrics.json``.

    Returns:
        ``(result, record)``: record = ``result.as_log("<split>/")`` (loss, top1, top5, balanced and macro metrics;
        multi-label: loss, mAP, mAP_micro, f1_micro, f1_macro, exact_set_accuracy, hamming_loss).

    Raises:
        trainer.checkpoint.state.CheckpointError: unreadable checkpoint.
    """
    from trainer.reporting.tracking import Tracker
    from trainer.checkpoint.inference import load_for_inference, read_model_meta
    from trainer.checkpoint.labels import decision_thresholds

    model, pre, class_names = load_for_inference(checkpoint, device=accelerator.device)
    thresholds = decision_thresholds(read_model_meta(checkpoint), len(class_names), thresholds)
    reporter = Reporter(out_dir or ".", class_names, accelerator, tracker or Tracker.disabled())
    if thresholds is not None:  # a multi-label checkpoint
        return _evaluate_multilabel_checkpoint(model, pre, shards, class_names, checkpoint=checkpoint,
                                               accelerator=accelerator, split=split, out_dir=out_dir, tracker=tracker,
                                               reporter=reporter, step=step, micro_batch_size=micro_batch_size,
                                               num_workers=num_workers,
                                               thresholds=thresholds)
    collector = reporter.collector()
    result = evaluate_model(model, pre, shards, class_names=class_names, accelerator=accelerator,
                            micro_batch_size=micro_batch_size, num_workers=num_workers, on_batch=collector)
    record = result.as_log(prefix=f"{split}/")
    pred = collector.gather(accelerator)
    if tracker is not None:
        tracker.log(record, step=step)
        tracker.summary({k: v for k, v in record.items() if k in (f"{split}/top1", f"{split}/loss")})
    if out_dir is not None and pred is not None:  # main process
        reporter.write_tables(result, reporter.dir, split)
        paths = reporter.write_best(result, pred, title=f"{Path(checkpoint).name} on {split}", split=split)
        if tracker is not None:
            tracker.log_images({f"reports/{split}_{k}": v for k, v in paths.items() if k != "predictions"},
                               step=step)
        atomic_write(reporter.dir / f"{split}_metrics.json",
                     json.dumps({"checkpoint": str(checkpoint), "step": step, **record}, indent=1) + "\n")
    return result, record


def _evaluate_multilabel_checkpoint(model, pre, shards, class_names, *, checkpoint, accelerator, split, out_dir,
                                    tracker, reporter, step, micro_batch_size, num_workers, thresholds):
    """:func:`evaluate_checkpoint` of a multi-label checkpoint (see there)."""
    collector = reporter.label_set_collector(thresholds)
    result = evaluate_model(model, pre, shards, class_names=class_names, accelerator=accelerator,
                            micro_batch_size=micro_batch_size, num_workers=num_workers, multilabel=True,
                            thresholds=thresholds, on_batch=collector)
    record = result.as_log(prefix=f"{split}/")
    mistakes = collector.gather(accelerator)  # a collective: every rank
    if tracker is not None:
        tracker.log(record, step=step)
        tracker.summary({k: v for k, v in record.items() if k in (f"{split}/mAP", f"{split}/loss")})
    if out_dir is not None and accelerator.is_main_process:
        paths = reporter.write_multilabel(result, mistakes, split=split, title=f"{Path(checkpoint).name} on {split}")
        if tracker is not None:
            tracker.log_images({f"reports/{split}_{k}": v for k, v in paths.items() if k != "per_class"}, step=step)
        atomic_write(reporter.dir / f"{split}_metrics.json",
                     json.dumps({"checkpoint": str(checkpoint), "step": step, **record}, indent=1) + "\n")
    return result, record


def test_pending(out_dir: str | Path) -> bool:
    """True unless ``reports/test_metrics.json`` (written last by the test evaluation of :func:`test_best_checkpoint`)
    is at least as new as ``checkpoints/best/model.json``: the test evaluation of the current best model is not
    complete (not run yet, or a kill interrupted it: a ``test/`` record without its reports is then redone)."""
    from trainer.checkpoint.inference import META_FILE, best_dir

    done, meta = Path(out_dir) / "reports" / "test_metrics.json", best_dir(out_dir) / META_FILE
    return not (done.is_file() and meta.is_file() and done.stat().st_mtime_ns >= meta.stat().st_mtime_ns)


def records_to_redo(progress, out_dir: str | Path) -> tuple[str, ...]:
    """Key prefixes of the ``metrics.jsonl`` records at a resume checkpoint's step that the resumed run logs again
    (so they are rewound: :func:`trainer.reporting.tracking.rewind_metrics`): ``val/`` when the checkpoint was
    written before that step's validation (``progress.eval_step < progress.step``: an epoch end's preemption),
    ``test/`` when the test evaluation of ``checkpoints/best/`` is not complete (:func:`test_pending`)."""
    return (("val/",) if progress.eval_step < progress.step else ()) + (("test/",) if test_pending(out_dir) else ())


def test_best_checkpoint(out_dir: Path, best: Path, test_shards: Sequence[str] | None, *, accelerator, tracker,
                         step: int, micro_batch_size: int, num_workers: int) -> dict | None:
    """At the end of a run: evaluate the inference checkpoint folder ``best`` on the test split once (skipped
    when there is no test split, no checkpoint, or ``reports/test_metrics.json`` is newer than its ``model.json``).

    Returns:
        the ``test/...`` record, or None when skipped.
    """
    from trainer.checkpoint.inference import META_FILE

    if not test_shards or not (Path(best) / META_FILE).is_file() or not test_pending(out_dir):
        return None
    result, record = evaluate_checkpoint(best, test_shards, accelerator=accelerator, split="test", out_dir=out_dir,
                                         tracker=tracker, step=step, micro_batch_size=micro_batch_size,
                                         num_workers=num_workers)
    if isinstance(result, MultiLabelResult):
        log.info("test split (checkpoints/best): test/loss %.4f test/mAP %.4f test/exact_set_accuracy %.4f on %d "
                 "samples", result.loss, result.map, result.exact_set_accuracy, result.num_samples)
    else:
        log.info("test split (checkpoints/best): test/loss %.4f test/top1 %.4f on %d samples", result.loss,
                 result.top1, result.num_samples)
    if accelerator.is_main_process:  # the model card of checkpoints/best/ names its test metrics too
        from trainer.checkpoint.inference import write_model_card

        write_model_card(best, test_metrics=record)
    return record


@dataclass
class Validation:
    """One evaluation of the validation split during training: the raw weights and, with ``train.ema_decay``,
    the EMA weights beside them.

    Attributes:
        result, collector: :class:`EvalResult` and prediction collector of the *chosen* weights (for reports);
            multi-label: :class:`MultiLabelResult` (thresholds chosen on this validation) and a
            :class:`trainer.reporting.multilabel_plots.LabelSetCollector` (the worst-predicted images).
        raw: ``val/*`` record of the raw weights. ema: the EMA weights' record under the same ``val/*``
            names, or None. which: ``raw`` or ``ema``, the weights that select ``checkpoints/best/``.
        chosen: the record of ``which`` (early stopping and ``checkpoints/best/`` metrics).
    """

    result: EvalResult | MultiLabelResult
    collector: object
    raw: dict
    ema: dict | None
    which: str
    chosen: dict

    @property
    def ema_record(self) -> dict:
        """The EMA metrics as ``val_ema/*`` (empty without EMA), logged beside ``val/*``."""
        return {"val_ema/" + k[len("val/"):]: v for k, v in (self.ema or {}).items()}


def validate(model: torch.nn.Module, ema, loader: Iterable[dict], feature_cache=None, *, reporter: Reporter,
             num_classes: int, accelerator, monitor: str, mode: str, multilabel: bool = False) -> Validation:
    """Evaluate ``model`` (plain) and, if ``ema`` (a :class:`trainer.train.ema.ModelEma`) is set, its EMA copy on
    the validation split; :func:`trainer.train.ema.choose` picks the one that selects ``checkpoints/best/``.

    Args:
        loader: the validation split's eval loader. feature_cache: the run's
            :class:`trainer.train.feature_cache.FeatureCache` (its batches replace the loader's) or None.
        monitor, mode: ``train.early_stopping.monitor`` and its resolved mode (``max`` / ``min``).
        multilabel: ``data.task: multilabel`` (labels are ``(B, C)`` label sets; thresholds chosen on this split).

    Every rank must call it (the metrics end in an all-reduce).
    """
    from trainer.train.ema import choose

    def one(m: torch.nn.Module):
        collector = reporter.label_set_collector() if multilabel else reporter.collector()
        batches = iter(loader) if feature_cache is None else feature_cache.eval_batches(m, loader)
        res = evaluate(m, batches, num_classes=num_classes, accelerator=accelerator, on_batch=collector,
                       multilabel=multilabel)
        return res, collector

    res, collector = one(model)
    raw, ema_eval = res.as_log("val/"), None
    if ema is not None:
        ema_res, ema_collector = one(ema.module)
        ema_eval = ema_res.as_log("val/")
    which, chosen = choose(raw, ema_eval, monitor, mode)
    if which == "ema":
        res, collector = ema_res, ema_collector
    return Validation(result=res, collector=collector, raw=raw, ema=ema_eval, which=which, chosen=chosen)


def record_validation(v: Validation, progress, *, extra: dict, tracker, stopper, checkpointer, reporter,
                      is_main: bool) -> bool:
    """What a run does with one validation at ``progress.step``: log ``val/*``, ``val_ema/*`` and ``extra``
    (epoch, samples_seen, ...) to ``metrics.jsonl`` / W&B, update early stopping (``stopper``), write
    ``checkpoints/best/`` when the monitored metric improved (``progress.best_top1`` then becomes its top-1;
    multi-label: its exact-set accuracy, and the thresholds chosen on this validation go with the model),
    and the reports. Every rank calls it (all take the same decision from the same reduced metrics).

    Args:
        progress: the run's :class:`trainer.checkpoint.state.Progress` (``best_top1`` updated in place).
        checkpointer: the run's :class:`trainer.checkpoint.checkpointer.Checkpointer` (``save_best``).

    Returns:
        True if this evaluation improved the monitored metric (``checkpoints/best/`` was written).
    """
    p = progress
    p.eval_step = p.step  # the next checkpoint includes this evaluation (no second record of it after a resume)
    tracker.log({**extra, **v.raw, **v.ema_record}, step=p.step)
    multilabel = isinstance(v.result, MultiLabelResult)
    if is_main and multilabel:
        log.info("epoch %d step %d: val/loss %.4f val/mAP %.4f val/f1_micro %.4f val/exact_set_accuracy %.4f%s",
                 p.epoch, p.step, v.raw["val/loss"], v.raw["val/mAP"], v.raw["val/f1_micro"],
                 v.raw["val/exact_set_accuracy"], "" if v.ema is None else
                 f" val_ema/loss {v.ema['val/loss']:.4f} val_ema/mAP {v.ema['val/mAP']:.4f}")
    elif is_main:
        log.info("epoch %d step %d: val/loss %.4f val/top1 %.4f%s", p.epoch, p.step, v.raw["val/loss"],
                 v.raw["val/top1"], "" if v.ema is None else
                 f" val_ema/loss {v.ema['val/loss']:.4f} val_ema/top1 {v.ema['val/top1']:.4f}")
    improved = stopper.update(v.chosen, step=p.step, epoch=p.epoch)
    if improved:  # checkpoints/best/ follows train.early_stopping.monitor; best_top1 is top-1 of that model
        p.best_top1 = v.result.top1  # multi-label: exact-set accuracy
        checkpointer.save_best(p, {**v.chosen, **v.ema_record}, weights=v.which,
                               thresholds=v.result.thresholds.tolist() if multilabel else None)
        if v.ema is not None:
            log.info("best.pt: %s weights of the %s stage (%s %.4f)", v.which, checkpointer.stage(p),
                     stopper.monitor, v.chosen[stopper.monitor])
        tracker.summary({"best/val_top1": p.best_top1, "best/epoch": p.epoch, "best/weights": v.which,
                         **stopper.summary()})
    if not multilabel:
        reporter.after_eval(v.result, v.collector, improved=improved, step=p.step, epoch=p.epoch)
    else:  # the per-class table; with checkpoints/best/ the val_* tables and plots in reports/ too
        reporter.after_eval_multilabel(v.result, v.collector, improved=improved, step=p.step, epoch=p.epoch)
    if stopper.should_stop:
        log.info("early stopping at epoch %d step %d: %s did not improve by more than %g for %d "
                 "evaluations (best %.4f at epoch %s)", p.epoch, p.step, stopper.monitor,
                 stopper.min_delta, stopper.wait, stopper.best, stopper.best_epoch)
    return improved
