"""Classify images with a trained checkpoint and stream the predictions into a CSV.

    python launch/predict.py --checkpoint runs/ants_bees_lite0/checkpoints/best \\
        --images ../shared/data/hymenoptera_data/val --out predictions.csv [--topk 2] [--tta] [--num_workers 4]

``--images`` is an image folder (searched recursively), a single image file, a CSV list of files (``.csv``) or
shards; where the true labels come from is in :mod:`trainer.data.image_source` (class-named parent folders, a CSV
label column, the shards' stored labels).

The checkpoint (``model.safetensors`` + ``model.json``, ``trainer/checkpoint/inference.py``) is
self-contained; nothing is downloaded. Preprocessing is the model's own: the eval transform of
``trainer/data/transforms.py`` with the checkpoint's input size, crop and interpolation on the output of
``trainer/data/decode.py``, then the model's mean/std, exactly what evaluation does, so predictions match it.

Speed: ``--num_workers`` DataLoader processes read and decode batches of ``--batch_size`` images
(batch ``k`` in worker ``k % num_workers``, so rows come out in input order; shards: worker ``w`` reads
shards ``w, w + num_workers, ...``) while the main process runs the model (channels_last, on the GPU
when there is one: ``--device auto``; in bfloat16 autocast where the hardware computes it natively, as
the trainer's ``mixed_precision: auto`` does for a frozen backbone: ``--precision auto``, see
:func:`resolve_precision`). Rows are written as each batch finishes (memory does not grow
with the number of images; a folder's file names are listed first) into a temp file renamed to
``--out`` at the end, so an interrupted run leaves no partial CSV.

CSV columns: ``path``, ``true`` (or empty), ``pred``, ``prob`` (of pred), ``top1..topK``, ``prob1..probK``,
``p_<class>`` for every class, ``error``. An unreadable image has an empty prediction and the reason in
``error``; it is not counted in the printed top-1 (the count of such images is printed beside it).
``path`` is the file name as text (:func:`trainer.data.listing.escape_name`): a backslash is written
``\\\\``, bytes that are not UTF-8 and control characters (newline...) ``\\xNN``, so any name the file
system allows fits on one line and ``unescape_name`` gives its exact bytes back. ``--tta`` averages the
softmax of the image and its horizontal flip.

Multi-label checkpoints (``data.task: multilabel``): ``p_<class>`` are sigmoid probabilities (``--tta``: the mean
of the two sigmoids); a class is predicted when ``p >= threshold`` of its class
(:func:`trainer.reporting.multilabel.binarize`), the per-class thresholds chosen on the validation split and saved
in the checkpoint (0.5 where it has none), or ``--threshold X`` for every class. CSV columns: ``path``, ``true``
(the true label set, its classes joined with the checkpoint's ``data.label_delimiter`` in class order; empty when
unknown or empty), ``pred`` (the predicted set, the same way; the empty set is an empty string), ``num_pred``,
``p_<class>`` for every class, ``error``. Printed and returned: the exact-set accuracy (with the micro F1) over
the labelled readable images, as ``finetune evaluate`` / the run's ``test/exact_set_accuracy`` computes it.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from trainer.cli.errors import run_cli
from trainer.data.image_source import ImageSource
from trainer.data.listing import escape_name, printable
from trainer.data.transforms import build_transforms
from trainer.checkpoint.inference import load_for_inference, read_model_meta
from trainer.files.atomic import atomic_write


@torch.inference_mode()
def predict_logits(model, images: torch.Tensor, *, tta: bool = False, bf16: bool = False,
                   multilabel: bool = False) -> torch.Tensor:
    """Class probabilities for a batch.

    Args:
        model: an :class:`trainer.models.classifier.ImageClassifier` (it normalises the images).
        images: (B, 3, H, W) uint8.
        tta: also run the horizontally flipped batch and average the two outputs' probabilities.
        bf16: run the model under ``torch.autocast`` in bfloat16 on the images' device type (the
            softmax / sigmoid is taken in float32).
        multilabel: per-class sigmoid probabilities instead of the softmax over the classes.

    Returns:
        (B, C) float32 probabilities.
    """
    def probs(x):
        logits = model(x).float()
        return logits.sigmoid() if multilabel else logits.softmax(dim=1)

    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = probs(images)
        if tta:
            out = (out + probs(images.flip(dims=[3]))) / 2
    return out


def resolve_precision(precision: str, device: str) -> str:
    """``fp32`` or ``bf16`` for ``--precision`` on ``device`` (``cpu`` / ``cuda``).

    ``auto``: ``bf16`` where the hardware computes bfloat16 natively (a CUDA GPU of compute capability
    >= 8.0, a CPU with ``avx512_bf16`` or ``amx_bf16``: :func:`trainer.config.launcher.bf16_hardware`),
    else ``fp32``: the rule of the trainer's ``train.mixed_precision: auto`` for a frozen backbone,
    which inference is. Predicted classes match float32 on the benchmark in docs/performance.md; probabilities
    differ by a few 1e-2 (0.028 at most there; bfloat16 keeps 8 bits of mantissa), so ``fp32`` is there
    for exact ones.

    Raises:
        ConfigError: a value other than auto / fp32 / bf16.
    """
    from trainer.config.fields import ConfigError
    from trainer.config.launcher import bf16_hardware, resolve_mixed_precision

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision: {precision!r} is not one of auto, fp32, bf16")
    if precision != "auto":
        return precision
    # the trainer's own rule, on this device's hardware; no launcher variables (env={}) for predict
    hw = bf16_hardware({"ACCELERATE_USE_CPU": "1"} if device == "cpu" else {})
    return "bf16" if resolve_mixed_precision("auto", {}, frozen_backbone=True, hardware=hw)[0] == "bf16" else "fp32"


def default_workers() -> int:
    """DataLoader workers by default: the CPU count, at most 8."""
    return min(8, os.cpu_count() or 1)


def multilabel_thresholds(meta: dict, num_classes: int, threshold: float | None) -> list[float] | None:
    """The per-class thresholds predict applies to a checkpoint, or None for a single-label one.

    Args:
        meta: the checkpoint's ``model.json`` (:func:`trainer.checkpoint.inference.read_model_meta`).
        num_classes: C.
        threshold: ``--threshold``: one value for every class (None: the saved ``thresholds``, else 0.5).

    Returns:
        C thresholds in (0, 1) for a multi-label checkpoint (``config.data.task: multilabel``), else None.

    Raises:
        ConfigError: ``--threshold`` given for a single-label checkpoint.
        CheckpointError: saved thresholds that are not C numbers in [0, 1].
    """
    from trainer.checkpoint.labels import decision_thresholds
    from trainer.config.fields import ConfigError

    thresholds = decision_thresholds(meta, num_classes, threshold)
    if thresholds is None and threshold is not None:
        raise ConfigError(f"--threshold: {threshold} is for multi-label checkpoints (data.task: multilabel); "
                          "this one is single-label (its prediction is the top-1 class)")
    return thresholds


def main(checkpoint: str, images: str, out: str = "predictions.csv", batch_size: int = 32, topk: int = 1,
         tta: bool = False, num_workers: int | None = None, device: str = "auto", precision: str = "auto",
         path_column: int | str | None = None, label_column: int | str | None = None,
         threshold: float | None = None) -> float | None:
    """Write predictions for every image of ``images`` to ``out``; return top-1 where labels are known
    (multi-label checkpoints: the exact-set accuracy).

    Args:
        checkpoint: the inference checkpoint folder (``<run>/checkpoints/best``), a file in it, the run
            folder, or a ``best.pt`` / ``last.pt`` (see ``trainer.checkpoint.inference.resolve``).
        images: an image folder (recursive; class-named parent folders give labels), an image file, a CSV
            list of files, or shards.
        out: CSV file to write (streamed row by row into a temp file, renamed when complete).
        batch_size: images per forward pass (and per decoding task of a worker).
        topk: labels and probabilities per image in the CSV (at most the number of classes; single-label only).
        tta: also classify the horizontally flipped image and average the softmax (multi-label: sigmoid) outputs.
        num_workers: DataLoader worker processes reading and decoding images (0: in this process; default:
            CPU count, at most 8).
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (bfloat16 where the hardware computes it natively, else float32:
            :func:`resolve_precision`), ``fp32`` or ``bf16``.
        path_column: column of the image paths in a CSV list (name or 0-based index; default: found by name).
        label_column: column of the labels in a CSV list (name or 0-based index; default: found by name).
        threshold: multi-label checkpoints: predict a class when its probability is >= this, for every class, in
            (0, 1) (default: the per-class thresholds saved in the checkpoint, chosen on the validation split).

    Raises:
        ConfigError: a bad option (one line, exit status 2). DataError: a bad CSV list (column, multi-label label).
        CheckpointError: an unreadable checkpoint.
    """
    from trainer.config.fields import ConfigError

    if batch_size < 1 or (num_workers is not None and num_workers < 0) or topk < 1:
        raise ConfigError(f"--batch_size and --topk must be >= 1 and --num_workers >= 0, got {batch_size}, {topk}, "
                          f"{num_workers}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not one of auto, cpu, cuda")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold < 1.0):
        raise ConfigError(f"--threshold: {threshold!r} is not a number in (0, 1) (exclusive)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = resolve_precision(precision, device) == "bf16"
    workers = default_workers() if num_workers is None else num_workers
    meta = read_model_meta(checkpoint)
    model, pre, classes = load_for_inference(checkpoint, device)
    thresholds = multilabel_thresholds(meta, len(classes), threshold)
    model = model.to(memory_format=torch.channels_last)  # faster convolutions (CPU and GPU); same values
    model.memory_format = torch.channels_last
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    data = (meta.get("config") or {}).get("data") or {}
    multilabel, delimiter = thresholds is not None, data.get("label_delimiter") or "|"
    source = ImageSource(images, classes, tf, batch_size, path_column=path_column, label_column=label_column,
                         multilabel=multilabel, label_delimiter=delimiter,
                         label_columns=data.get("label_columns") is not None)
    loader = DataLoader(source, batch_size=None, num_workers=workers, pin_memory=device == "cuda",
                        prefetch_factor=4 if workers else None)
    run = _forward_batches(loader, model, device, tta=tta, bf16=bf16, multilabel=multilabel)
    if multilabel:
        how = (f"--threshold {threshold:g}" if threshold is not None else "the checkpoint's per-class thresholds"
               if meta.get("thresholds") is not None else "threshold 0.5 (the checkpoint saved none)")
        how += f", {'bf16' if bf16 else 'fp32'} on {device}"
        return write_multilabel(run, out, classes, thresholds, delimiter, how=how)
    topk = min(topk, len(classes))
    header = (["path", "true", "pred", "prob"] + [f"top{i + 1}" for i in range(topk)]
              + [f"prob{i + 1}" for i in range(topk)] + [f"p_{c}" for c in classes] + ["error"])
    counts = {"labelled": 0, "correct": 0}

    def row(true: str, p: torch.Tensor) -> list:
        tp, ti = p.topk(topk)
        pred = classes[ti[0]]
        if true:
            counts["labelled"] += 1
            counts["correct"] += int(true == pred)
        return ([true, pred, f"{tp[0]:.6f}"] + [classes[i] for i in ti] + [f"{v:.6f}" for v in tp]
                + [f"{v:.6f}" for v in p] + [""])

    rows, bad = write_rows(run, out, header, row)
    acc = counts["correct"] / counts["labelled"] if counts["labelled"] else None
    print(f"wrote {rows} predictions to {out}"
          + (f"; top-1 {acc:.4f} on {counts['labelled']} labelled readable images" if acc is not None else "")
          + f" ({'bf16' if bf16 else 'fp32'} on {device})" + (f" ({bad} unreadable)" if bad else ""))
    return acc


def write_rows(run, out: str, header: list[str], row, true_text=str) -> tuple[int, int]:
    """Stream ``run`` (:func:`_forward_batches`) into the CSV ``out`` (a temp file renamed when complete): ``header``,
    then one line per image: its escaped path and ``row(true, p)`` for a readable image (``p``: its (C,)
    probabilities), or ``true_text(true)``, empty cells and the reason in ``error`` for an unreadable one (a warning
    on stderr names up to 3).

    Returns:
        ``(lines written, unreadable images)``.
    """
    counts = {"rows": 0, "bad": 0}
    bad_examples: list[str] = []
    blank = [""] * (len(header) - 3)  # every column but path, true and error

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for batch, probs in run:
                j = 0
                for name, true, ok, err in zip(batch["name"], batch["true"], batch["ok"], batch["error"]):
                    if not ok:
                        counts["bad"] += 1
                        if len(bad_examples) < 3:
                            bad_examples.append(f"{printable(name)}: {err}")
                        w.writerow([escape_name(name), true_text(true)] + blank + [err])
                        continue
                    w.writerow([escape_name(name)] + row(true, probs[j]))
                    j += 1
                counts["rows"] += len(batch["name"])

    atomic_write(out, write)
    if counts["bad"]:
        print(f"warning: {counts['bad']} unreadable image(s), listed in {out} with their error, e.g. "
              f"{'; '.join(bad_examples)}", file=sys.stderr)
    return counts["rows"], counts["bad"]


def _forward_batches(loader, model, device: str, *, tta: bool, bf16: bool, multilabel: bool):
    """``(batch, probs (n, C) float32 on the CPU or None)`` for every batch of ``loader`` (``n``: its readable
    images), lazily."""
    for batch in loader:
        probs = None
        if batch["image"] is not None:
            images = batch["image"].to(device, non_blocking=True)
            probs = predict_logits(model, images, tta=tta, bf16=bf16, multilabel=multilabel).cpu()
        yield batch, probs


def write_multilabel(run, out: str, classes: list[str], thresholds: list[float], delimiter: str, *,
                     how: str = "the checkpoint's per-class thresholds") -> float | None:
    """Write the multi-label CSV (module docstring) of ``run`` (:func:`_forward_batches`, sigmoid probabilities)
    to ``out`` and print the exact-set accuracy and micro F1 over the labelled readable images.

    Args:
        classes: the C class names. thresholds: C thresholds (a class is predicted when ``p >= threshold``).
        delimiter: joins the classes of a set in the ``true`` and ``pred`` cells.
        how: where the thresholds come from, for the printed line.

    Returns:
        The exact-set accuracy in [0, 1], None when no readable image has a known label set.
    """
    from trainer.reporting.multilabel import binarize

    header = ["path", "true", "pred", "num_pred"] + [f"p_{c}" for c in classes] + ["error"]
    counts = {"labelled": 0, "exact": 0, "tp": 0, "fp": 0, "fn": 0}

    def text(indices) -> str:
        return "" if indices is None else delimiter.join(classes[i] for i in sorted(indices))

    def row(true, p: torch.Tensor) -> list:
        pred = {int(i) for i in torch.nonzero(binarize(p[None], thresholds)[0]).flatten()}
        if true is not None:
            counts["labelled"] += 1
            counts["exact"] += int(pred == set(true))
            counts["tp"] += len(pred & set(true))
            counts["fp"] += len(pred - set(true))
            counts["fn"] += len(set(true) - pred)
        return [text(true), text(pred), len(pred)] + [f"{v:.6f}" for v in p] + [""]

    rows, bad = write_rows(run, out, header, row, true_text=text)
    n = counts["labelled"]
    acc = counts["exact"] / n if n else None
    f1_den = 2 * counts["tp"] + counts["fp"] + counts["fn"]
    micro_f1 = 2 * counts["tp"] / f1_den if f1_den else 0.0
    print(f"wrote {rows} predictions to {out}"
          + (f"; exact-set accuracy {acc:.4f}, micro F1 {micro_f1:.4f} on {n} labelled readable images at {how}"
             if acc is not None else "")
          + (f" ({bad} unreadable)" if bad else ""))
    return acc


def cli() -> None:
    """Console script ``finetune-predict`` (same as ``python launch/predict.py``)."""
    run_cli(main, prog="finetune-predict")


if __name__ == "__main__":
    run_cli(main)
