"""Evaluate a checkpoint on one split of any data source the trainer reads, with the end-of-run test reports.

    python launch/evaluate.py --checkpoint runs/eurosat_lite0/checkpoints/best \\
        --data ../shared/data/eurosat/test.csv --label_map ../shared/data/eurosat/label_map.json
    python launch/evaluate.py --checkpoint runs/ants_bees_lite0 --data ../shared/data/hymenoptera_data --split val
    python launch/evaluate.py --checkpoint runs/x/checkpoints/best --data data/shards/x --split test --num_workers 4

``--data`` is one of (checked in this order):

* shards: a folder holding ``dataset.json`` (or the ``dataset.json`` file itself): the split's shards;
  or any shard spec (:func:`trainer.data.sources.resolve_shards`: brace pattern, glob, URL) with
  ``--meta path/dataset.json`` for the class names;
* a manifest file (CSV / JSONL, columns as ``data.path_column`` etc., see :mod:`trainer.data.manifest`):
  with a split column its ``--split`` rows, without one every row;
* an image folder: ``root/{train,val,test}/<class>/<image>`` (the ``--split`` folder; classes from
  ``train/``), or ``root/<class>/<image>`` (every image; classes = the class folders).

``--data`` is resolved by the data layer (:func:`trainer.data.split_source.shards_for_split`): folders and
manifests are written into shards (unreadable files skipped and counted) into ``<out_dir>/.shards-<split>``,
removed afterwards, or into ``--shard_dir`` (kept, and reused while the source is unchanged).
The class names of the data (in label order) must equal the checkpoint's ``class_names``; otherwise one
line naming both files and exit status 2.

The evaluation is :func:`trainer.train.evaluation.evaluate_checkpoint`, the one the trainer runs on the
test split at the end of a run: it prints ``<split>/top1``, ``<split>/loss`` and per-class accuracy, and
writes into ``<out_dir>/reports/``: ``<split>_metrics.json``, ``<split>_per_class.csv``,
``<split>_confused_pairs.csv``, ``<split>_predictions.csv`` and the confusion, per-class and mistakes
plots (``<split>_confusion_matrix.png``...; for ``val`` the names of the run's validation plots).
``out_dir`` defaults to ``<run>/eval-<split>`` for a checkpoint inside a run folder, so the
run's own ``reports/`` are never overwritten. Runs under ``accelerate launch`` too (each sample is
evaluated by one rank). ``finetune-evaluate`` is the same command as a console script.

Multi-label checkpoints (``data.task: multilabel`` in the config saved in ``model.json``): manifests are read with
the checkpoint's ``data.task``, ``data.label_delimiter`` and ``data.label_columns``; shards must have been written
for ``data.task: multilabel`` (``dataset.json``'s ``task``; one line, exit status 2 otherwise); image folders carry
one label per image, not label sets, and are refused (one line). Labels are predicted at the per-class thresholds
saved in ``model.json`` (chosen on the validation split), or at ``--threshold X`` (one value in (0, 1) for every
class). It prints ``<split>/mAP``, ``mAP_micro``, ``f1_micro``, ``f1_macro``, ``exact_set_accuracy``,
``hamming_loss``, ``loss`` and per class: support, AP, F1, threshold, false positives and false negatives, and
writes ``<split>_metrics.json``, ``<split>_per_class.csv`` (with ``tp``, ``fp``, ``fn``: the multi-label
confusion), ``<split>_ap_per_class.png``, ``<split>_pr_curves.png`` and ``<split>_mistakes.png``
(:mod:`trainer.reporting.multilabel_plots`)::

    python launch/evaluate.py --checkpoint runs/eurosat_mosaic_lite0_finetune/checkpoints/best \\
        --data data/shards/eurosat_mosaics --split test
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.cli.errors import run_cli
from trainer.data.listing import DataError

SPLITS = ("train", "val", "test")


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def check_classes(data_classes: list[str], where: str, ckpt_classes: list[str], ckpt_file: str) -> None:
    """Refuse data whose class names (label order) differ from the checkpoint's.

    Raises:
        DataError: one line naming both files and the first difference.
    """
    if list(data_classes) == list(ckpt_classes):
        return
    diff = next((i for i, (a, b) in enumerate(zip(data_classes, ckpt_classes)) if a != b),
                min(len(data_classes), len(ckpt_classes)))
    raise DataError(f"--data: the classes of {where} [{_short(list(data_classes))}] differ from those of the "
                    f"checkpoint {ckpt_file} [{_short(list(ckpt_classes))}] (first difference at label {diff}); "
                    "evaluate on data with the checkpoint's classes, in the same order")


def check_task(data_task: str, where: str, multilabel: bool, ckpt_file: str) -> None:
    """Refuse shards written for another task (``dataset.json``'s ``task``) than the checkpoint's ``data.task``.

    Raises:
        DataError: one line naming both files and both tasks.
    """
    want = "multilabel" if multilabel else "multiclass"
    if data_task == want:
        return
    holds = "label sets" if data_task == "multilabel" else "one label per sample"
    raise DataError(f"--data: {where} holds shards written for data.task: {data_task} ({holds}), but the checkpoint "
                    f"{ckpt_file} is a {'multi-label' if multilabel else 'single-label'} model (data.task: {want}); "
                    f"evaluate on data written for data.task: {want}")


def manifest_params(ckpt_meta: dict) -> dict:
    """How a multi-label checkpoint's manifests are read: ``task``, ``label_delimiter`` and ``label_columns`` of
    the config saved in its ``model.json`` (defaults ``|`` and None, as ``data.*``)."""
    data = (ckpt_meta.get("config") or {}).get("data") or {}
    return {"task": "multilabel", "label_delimiter": data.get("label_delimiter") or "|",
            "label_columns": data.get("label_columns")}


def print_multilabel(result, split: str, class_names: list[str], thresholds_from: str) -> None:
    """Print a multi-label result (:class:`trainer.reporting.multilabel_eval.MultiLabelResult`): mAP, micro mAP,
    micro / macro F1, exact-set accuracy, Hamming loss, loss, where the thresholds come from, and one row per
    class: support (positive labels), AP (n/a without positives), F1, threshold, false positives, false negatives."""
    print(f"{split}/mAP {result.map:.4f}  {split}/mAP_micro {result.map_micro:.4f}  "
          f"{split}/f1_micro {result.f1_micro:.4f}  {split}/f1_macro {result.f1_macro:.4f}")
    print(f"{split}/exact_set_accuracy {result.exact_set_accuracy:.4f}  {split}/hamming_loss "
          f"{result.hamming_loss:.4f}  {split}/loss {result.loss:.4f}")
    print(f"thresholds: {thresholds_from}")
    width = max([len("class")] + [len(c) for c in class_names])
    print(f"  {'class':<{width}}  {'support':>7}  {'AP':>8}  {'F1':>8}  {'threshold':>9}  {'FP':>7}  {'FN':>7}")
    f1 = result.f1
    for i, name in enumerate(class_names):
        ap = "     n/a" if result.ap[i] != result.ap[i] else f"{result.ap[i]:8.4f}"
        print(f"  {name:<{width}}  {int(result.support[i]):>7}  {ap}  {f1[i]:8.4f}  "
              f"{float(result.thresholds[i]):9.4f}  {int(result.fp[i]):>7}  {int(result.fn[i]):>7}")


def main(checkpoint: str, data: str, split: str = "test", out_dir: str | None = None, meta: str | None = None,
         shard_dir: str | None = None, path_column: int | str | None = None,
         label_column: int | str | None = None, split_column: int | str | None = None, label_map: str | None = None,
         batch_size: int = 64, num_workers: int = 2, threshold: float | None = None) -> dict:
    """Evaluate ``checkpoint`` on split ``split`` of ``data``; print top-1, loss, per-class accuracy (multi-label:
    mAP, micro mAP, micro / macro F1, exact-set accuracy, Hamming loss and a per-class table); write reports.

    Args:
        checkpoint: inference checkpoint folder (``<run>/checkpoints/best``), a file in it, the run folder,
            or a ``.pt``.
        data: shards (folder with dataset.json, or a spec with --meta), a CSV/JSONL manifest, or an image folder.
        split: which split of ``data`` (train, val or test; ``validation`` and ``valid`` mean val); names the
            metrics and report files.
        out_dir: reports go to ``out_dir/reports``; default ``<run>/eval-<split>`` (or ``./eval-<split>``).
        meta: the ``dataset.json`` of a shard spec given as ``data``.
        shard_dir: keep the shards written from a folder or manifest here (reused while the source is unchanged).
        path_column: manifest column of the image paths (name or 0-based index), as ``data.path_column``.
        label_column: manifest column of the labels (name or 0-based index), as ``data.label_column``.
        split_column: manifest column of the split (name or 0-based index), as ``data.split_column``.
        label_map: JSON file mapping the manifest's labels to class names, as ``data.label_map``.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images (also shard-writing processes).
        threshold: multi-label checkpoints only: one threshold in (0, 1) for every class, replacing the per-class
            thresholds saved in ``model.json`` (default: the saved ones; 0.5 where there are none).

    Returns:
        the ``<split>/...`` record (loss, top1, balanced_acc, macro metrics, num_samples; multi-label: loss, mAP,
        mAP_micro, f1_micro, f1_macro, exact_set_accuracy, hamming_loss, num_samples, mAP_error_bound).

    Raises:
        ConfigError: a bad option (``--split``, ``--batch_size``, ``--threshold``...), one line.
        DataError: data whose classes or task (single- / multi-label) differ from the checkpoint's, an image folder
            for a multi-label checkpoint, no such split; one line.
    """
    from trainer.config.fields import ConfigError
    from trainer.config.launcher import resolve_mixed_precision
    from trainer.data.split_source import shards_for_split
    from trainer.distributed.accelerator import make_accelerator
    from trainer.checkpoint.labels import checkpoint_task
    from trainer.train.evaluation import evaluate_checkpoint
    from trainer.checkpoint.inference import META_FILE, read_model_meta, resolve

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    split = {"validation": "val", "valid": "val"}.get(split, split)  # the folder names read as val
    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r} is not one of {list(SPLITS)}")
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"--batch_size must be >= 1 and --num_workers >= 0, got {batch_size} and {num_workers}")
    if threshold is not None and not 0.0 < threshold < 1.0:  # also NaN
        raise ConfigError(f"--threshold: {threshold!r} is not in (0, 1) (a sigmoid probability: predict a label "
                          "when its probability >= threshold)")
    src = resolve(checkpoint)
    ckpt_file = str(src / META_FILE if src.is_dir() else src)
    ckpt_meta = read_model_meta(src)
    ckpt_classes = list(ckpt_meta["class_names"])
    multilabel, saved_thresholds = checkpoint_task(ckpt_meta)
    if threshold is not None and not multilabel:
        raise ConfigError(f"--threshold: {ckpt_file} is a single-label model (the top class is predicted); "
                          "--threshold applies to multi-label models (data.task: multilabel) only")
    if out_dir is None:
        run = src.parent.parent if src.parent.name == "checkpoints" else Path(".")  # best/, best.pt, last.pt
        out_dir = str(run / f"eval-{split}")
    # resolved once for this process, as a fine-tuning run resolves it (bf16 on a GPU, float32 on a CPU), so the
    # figures are the ones the run itself reports on the same data
    accelerator = make_accelerator(resolve_mixed_precision("auto")[0])

    def check(data_classes: list[str], where: str, data_task: str) -> None:
        check_task(data_task, where, multilabel, ckpt_file)
        check_classes(data_classes, where, ckpt_classes, ckpt_file)

    found = shards_for_split(data, split, meta=meta, shard_dir=shard_dir, tmp_dir=Path(out_dir) / f".shards-{split}",
                             path_column=path_column, label_column=label_column, split_column=split_column,
                             label_map=label_map, **(manifest_params(ckpt_meta) if multilabel else {}),
                             num_workers=num_workers, accelerator=accelerator, check=check)
    try:
        result, record = evaluate_checkpoint(src, found.urls, accelerator=accelerator, split=split, out_dir=out_dir,
                                             micro_batch_size=batch_size, num_workers=num_workers, thresholds=threshold)
    finally:
        found.remove_tmp(accelerator)
    if not accelerator.is_main_process:
        return record
    print(f"{split}: {result.num_samples} samples from {data}"
          + (f" ({found.num_skipped} unreadable file(s) not evaluated)" if found.num_skipped else ""))
    if multilabel:
        where = (f"--threshold {threshold:g} for every class" if threshold is not None else
                 f"per class, saved in {ckpt_file}" if saved_thresholds is not None else
                 f"0.5 ({ckpt_file} saves none)")
        print_multilabel(result, split, ckpt_classes, where)
        print(f"reports in {Path(out_dir) / 'reports'} ({split}_metrics.json, {split}_per_class.csv, "
              f"{split}_ap_per_class.png, {split}_pr_curves.png, {split}_mistakes.png)")
    else:
        print(f"{split}/top1 {result.top1:.4f}  {split}/loss {result.loss:.4f}  "
              f"{split}/balanced_acc {result.balanced_accuracy:.4f}")
        width = max(len(c) for c in ckpt_classes)
        print(f"  {'class':<{width}}  support  accuracy")
        for name, n, acc in zip(ckpt_classes, result.support.tolist(), result.per_class):
            print(f"  {name:<{width}}  {n:>7}  " + ("     n/a" if n == 0 else f"{acc:8.4f}"))
        print(f"reports in {Path(out_dir) / 'reports'} ({split}_metrics.json, {split}_per_class.csv, ...)")
    return record


def cli() -> None:
    """Console script ``finetune-evaluate`` (same as ``python launch/evaluate.py``)."""
    run_cli(main, prog="finetune-evaluate")


if __name__ == "__main__":
    run_cli(main)
