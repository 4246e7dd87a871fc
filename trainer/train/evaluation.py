"""Evaluate a trained model or checkpoint on a split's shards: metrics, per-class accuracy, confusion, reports.

Used at the end of a run (``checkpoints/best/`` on the test split, once: :func:`test_best_checkpoint`) and by
``launch/evaluate.py`` (:func:`evaluate_checkpoint`, any checkpoint and split). Every rank must call
these functions (the metrics end in one all-reduce; each sample is read by exactly one rank).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.data.loader import EvalLoader
from trainer.data.transforms import build_transforms
from trainer.reporting.metrics import EvalResult
from trainer.reporting.reporter import Reporter
from trainer.train.loop import evaluate
from trainer.utils.files import atomic_write

log = logging.getLogger("trainer")


def evaluate_model(model: torch.nn.Module, pre, shards: Sequence[str], *, class_names: Sequence[str], accelerator,
                   micro_batch_size: int = 64, num_workers: int = 2, bad_samples: str = "skip",
                   on_batch=None) -> EvalResult:
    """Evaluate ``model`` (plain, unwrapped; it normalises its uint8 input itself) on every sample of
    ``shards`` with its eval transform.

    Args:
        pre: the model's :class:`trainer.models.classifier.Preprocessing` (input size, crop, interpolation).
        shards: shard paths/URLs (see :func:`trainer.data.sources.resolve_shards`).
        on_batch: optional ``(batch, logits (B, C) float32 CPU) -> None`` (e.g. a PredictionCollector).

    Returns:
        :class:`EvalResult` over all ranks (loss = mean cross-entropy, top1 in [0, 1], per-class counts).
    """
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    loader = EvalLoader(list(shards), rank=accelerator.process_index, world_size=accelerator.num_processes,
                        micro_batch_size=micro_batch_size, num_workers=num_workers, transform=tf,
                        bad_samples=bad_samples, num_classes=len(class_names),
                        pin_memory=accelerator.device.type == "cuda")
    result = evaluate(model, iter(loader), num_classes=len(class_names), accelerator=accelerator,
                      on_batch=on_batch)
    if loader.last_skipped:
        log.warning("evaluation skipped %d bad sample(s) on rank %d, e.g. %s", len(loader.last_skipped),
                    accelerator.process_index, loader.last_skipped[:3])
    return result


def evaluate_checkpoint(checkpoint: str | Path, shards: Sequence[str], *, accelerator, split: str = "test",
                        out_dir: str | Path | None = None, tracker=None, step: int = 0,
                        micro_batch_size: int = 64, num_workers: int = 2) -> tuple[EvalResult, dict]:
    """Load an inference checkpoint (``checkpoints/best/``, see :mod:`trainer.train.inference_checkpoint`) and
    evaluate it on ``shards``.

    Args:
        split: name used in metric keys (``<split>/top1``...) and report files (``<split>_...``).
        out_dir: if set, the main process writes into ``out_dir/reports/``: ``<split>_per_class.csv``
            (support, precision, recall = per-class accuracy, F1), ``<split>_confused_pairs.csv`` (the
            confusion matrix, sparse), ``<split>_{confusion_matrix,per_class_accuracy,mistakes}.png``,
            ``<split>_predictions.csv`` and ``<split>_metrics.json``.
        tracker: a :class:`trainer.reporting.tracking.Tracker` to log the metrics and images to (main process).

    Returns:
        ``(result, record)``: record = ``result.as_log("<split>/")`` (loss, top1, top5, balanced and macro metrics).

    Raises:
        trainer.train.checkpoint.CheckpointError: unreadable checkpoint.
    """
    from trainer.reporting.tracking import Tracker
    from trainer.train.inference_checkpoint import load_for_inference

    model, pre, class_names = load_for_inference(checkpoint, device=accelerator.device)
    reporter = Reporter(out_dir or ".", class_names, accelerator, tracker or Tracker.disabled())
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


def test_best_checkpoint(out_dir: Path, best: Path, test_shards: Sequence[str] | None, *, accelerator, tracker,
                         step: int, micro_batch_size: int, num_workers: int) -> dict | None:
    """At the end of a run: evaluate the inference checkpoint folder ``best`` on the test split once (skipped
    when there is no test split, no checkpoint, or ``reports/test_metrics.json`` is newer than its ``model.json``).

    Returns:
        the ``test/...`` record, or None when skipped.
    """
    from trainer.train.inference_checkpoint import META_FILE

    done, meta = Path(out_dir) / "reports" / "test_metrics.json", Path(best) / META_FILE
    if not test_shards or not meta.is_file() or (done.is_file() and done.stat().st_mtime >= meta.stat().st_mtime):
        return None
    result, record = evaluate_checkpoint(best, test_shards, accelerator=accelerator, split="test", out_dir=out_dir,
                                         tracker=tracker, step=step, micro_batch_size=micro_batch_size,
                                         num_workers=num_workers)
    log.info("test split (checkpoints/best): test/loss %.4f test/top1 %.4f on %d samples", result.loss, result.top1,
             result.num_samples)
    return record
