"""Classify images with a trained checkpoint and stream the predictions into a CSV.

    python launch/predict.py --checkpoint runs/ants_bees_lite0/checkpoints/best \\
        --images ../shared/data/hymenoptera_data/val --out predictions.csv [--topk 2] [--tta] [--num_workers 4]

``--images`` is one of:

* an image folder, searched recursively (image suffixes only, hidden names skipped, sorted): a file
  whose parent folder is named like a class (``val/ants/x.jpg``) has that class as its true label;
* a single image file;
* a CSV list of files (``.csv``, header row): the path column (``--path_column``, else the first of
  ``path, filepath, filename, file, image...`` as in manifests, else the first column), paths relative
  to the CSV's folder; an optional label column (``--label_column``, else ``label, class...``) gives the
  true label (a class name or index);
* shards: a ``.tar`` file, a brace pattern / glob / URL, or a folder holding ``*.tar`` or a
  ``dataset.json``; the name is the sample's stored ``path.txt`` (else its key), the true label its
  ``cls`` when the ``dataset.json`` beside the shards has the checkpoint's classes.

The checkpoint (``model.safetensors`` + ``model.json``, ``trainer/train/inference_checkpoint.py``) is
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
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.cli.errors import run_cli
from trainer.data.decode import decode_image_bytes
from trainer.data.extensions import IMAGE_EXTENSIONS, IMAGE_FIELDS
from trainer.data.listing import DataError, escape_name, files_under, printable
from trainer.data.transforms import build_transforms
from trainer.train.inference_checkpoint import load_for_inference, refuse_multilabel
from trainer.utils.files import atomic_write


def _is_shards(path: Path, spec: str) -> bool:
    if path.is_dir():
        return (path / "dataset.json").is_file() or any(p.suffix == ".tar" for p in path.iterdir())
    return spec.endswith(".tar") or "://" in spec or spec.startswith("pipe:") or any(c in spec for c in "{*?[")


class ImageSource(IterableDataset):
    """Batches ``{"name": [str], "true": [str], "image": (n, 3, S, S) uint8 | None, "ok": [bool], "error": [str]}``
    of an image folder, image file, CSV list or shards (see the module docstring), decoded in the workers.

    Args:
        images: the ``--images`` argument. classes: the checkpoint's class names (true labels).
        transform: ``(3, H, W) uint8 -> (3, S, S) uint8`` (the eval transform).
        batch_size: images per batch. path_column, label_column: CSV columns (name or 0-based index).

    Raises:
        FileNotFoundError: ``images`` does not exist. DataError: a CSV without the named column.
    """

    def __init__(self, images: str, classes: list[str], transform, batch_size: int, path_column=None,
                 label_column=None):
        self.spec, self.path = str(images), Path(images)
        self.classes, self.transform, self.batch_size = list(classes), transform, batch_size
        self.path_column, self.label_column = path_column, label_column
        self.shards = None
        if _is_shards(self.path, self.spec):
            from trainer.data.meta import read_meta
            from trainer.data.sources import resolve_shards

            self.shards = resolve_shards(self.spec)
            meta = Path(self.shards[0]).parent / "dataset.json" if "://" not in self.shards[0] else None
            self.shard_labels = meta is not None and meta.is_file() and read_meta(meta).classes == self.classes
        elif not self.path.exists():
            raise FileNotFoundError(f"--images: no such file or folder: {self.path}")
        elif self.path.suffix.lower() == ".csv":
            self._csv_columns()  # check the columns now, in the main process

    # ---- the listed files: (name to read, true label) in input order
    def _csv_columns(self):
        from trainer.data.manifest import LABEL_NAMES, PATH_NAMES

        with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = next(csv.reader(f), None) or []

        def find(spec, names, required):
            if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
                return int(spec)
            if spec is not None:
                if spec not in header:
                    raise DataError(f"--images: column {spec!r} not in {self.path} (columns: {header})")
                return header.index(spec)
            lower = [h.strip().lower() for h in header]
            return next((lower.index(n) for n in names if n in lower), 0 if required else None)
        return find(self.path_column, PATH_NAMES, True), find(self.label_column, LABEL_NAMES, False)

    def _true(self, label: str) -> str:
        label = label.strip()
        if label in self.classes:
            return label
        return self.classes[int(label)] if label.isdigit() and int(label) < len(self.classes) else ""

    def files(self) -> Iterator[tuple[str, str]]:
        if self.path.is_file() and self.path.suffix.lower() == ".csv":
            pcol, lcol = self._csv_columns()
            base = self.path.parent
            with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                rows = csv.reader(f)
                next(rows, None)
                for row in rows:
                    if row:
                        label = row[lcol] if lcol is not None and lcol < len(row) else ""
                        yield os.path.join(base, row[pcol]) if pcol < len(row) else "", self._true(label)
        elif self.path.is_file():
            yield str(self.path), self._parent_class(str(self.path))
        else:
            for rel in files_under(self.path):
                if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                    name = os.path.join(self.path, rel)
                    yield name, self._parent_class(name)

    def _parent_class(self, name: str) -> str:
        parent = os.path.basename(os.path.dirname(os.path.abspath(name)))
        return parent if parent in self.classes else ""

    # ---- decoding
    def _decode(self, name: str, read) -> tuple[torch.Tensor | None, str]:
        try:
            return self.transform(decode_image_bytes(read())), ""
        except Exception as e:  # unreadable image: reported in the CSV's error column
            return None, " ".join(f"{type(e).__name__}: {e}".split())

    def _batch(self, items: list[tuple[str, str, object]]) -> dict:
        out = {"name": [], "true": [], "ok": [], "error": []}
        imgs = []
        for name, true, read in items:
            img, err = self._decode(name, read)
            out["name"].append(name)
            out["true"].append(true)
            out["ok"].append(img is not None)
            out["error"].append(err)
            if img is not None:
                imgs.append(img)
        out["image"] = torch.stack(imgs) if imgs else None
        return out

    def _samples(self, shards: list[str]) -> Iterator[tuple[str, str, object]]:
        from trainer.data.stream import iter_shard

        for url in shards:
            try:
                for s in iter_shard(url):
                    name = os.fsdecode(s["path.txt"]) if "path.txt" in s else s["__key__"]
                    data = next((s[e] for e in IMAGE_FIELDS if e in s), b"")
                    cls = s.get("cls", b"").decode("ascii", "replace").strip()
                    true = self.classes[int(cls)] if self.shard_labels and cls.isdigit() and \
                        int(cls) < len(self.classes) else ""
                    yield name, true, (lambda d=data: d)
            except Exception as e:  # unreadable shard: one row naming it
                yield url, "", (lambda e=e: _raise(e))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.shards is not None:  # worker w reads shards w, w + nw, ...
            items = self._samples(self.shards[wid::nw])
        else:  # batch k (of consecutive files) is decoded by worker k % nw: the loader yields input order
            items = ((f, t, (lambda f=f: _read(f))) for i, (f, t) in enumerate(self.files())
                     if (i // self.batch_size) % nw == wid)
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)


def _read(name: str) -> bytes:
    with open(name, "rb") as f:
        return f.read()


def _raise(e: BaseException):
    raise e


@torch.inference_mode()
def predict_logits(model, images: torch.Tensor, *, tta: bool = False, bf16: bool = False) -> torch.Tensor:
    """Class probabilities for a batch.

    Args:
        model: an :class:`trainer.models.classifier.ImageClassifier` (it normalises the images).
        images: (B, 3, H, W) uint8.
        tta: also run the horizontally flipped batch and average the softmax outputs.
        bf16: run the model under ``torch.autocast`` in bfloat16 on the images' device type (the
            softmax is taken in float32).

    Returns:
        (B, C) float32 probabilities.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = model(images).float().softmax(dim=1)
        if tta:
            probs = (probs + model(images.flip(dims=[3])).float().softmax(dim=1)) / 2
    return probs


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


def main(checkpoint: str, images: str, out: str = "predictions.csv", batch_size: int = 32, topk: int = 1,
         tta: bool = False, num_workers: int | None = None, device: str = "auto", precision: str = "auto",
         path_column: int | str | None = None, label_column: int | str | None = None) -> float | None:
    """Write predictions for every image of ``images`` to ``out``; return top-1 where labels are known.

    Args:
        checkpoint: the inference checkpoint folder (``<run>/checkpoints/best``), a file in it, the run
            folder, or a ``best.pt`` / ``last.pt`` (see ``trainer.train.inference_checkpoint.resolve``).
        images: an image folder (recursive; class-named parent folders give labels), an image file, a CSV
            list of files, or shards.
        out: CSV file to write (streamed row by row into a temp file, renamed when complete).
        batch_size: images per forward pass (and per decoding task of a worker).
        topk: labels and probabilities per image in the CSV (at most the number of classes).
        tta: also classify the horizontally flipped image and average the softmax outputs.
        num_workers: DataLoader worker processes reading and decoding images (0: in this process; default:
            CPU count, at most 8).
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (bfloat16 where the hardware computes it natively, else float32:
            :func:`resolve_precision`), ``fp32`` or ``bf16``.
        path_column: column of the image paths in a CSV list (name or 0-based index; default: found by name).
        label_column: column of the labels in a CSV list (name or 0-based index; default: found by name).
    """
    from trainer.config.fields import ConfigError

    if batch_size < 1 or (num_workers is not None and num_workers < 0) or topk < 1:
        raise ConfigError(f"--batch_size and --topk must be >= 1 and --num_workers >= 0, got {batch_size}, {topk}, "
                          f"{num_workers}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not one of auto, cpu, cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = resolve_precision(precision, device) == "bf16"
    workers = default_workers() if num_workers is None else num_workers
    refuse_multilabel(checkpoint, "finetune predict")
    model, pre, classes = load_for_inference(checkpoint, device)
    model = model.to(memory_format=torch.channels_last)  # faster convolutions (CPU and GPU); same values
    model.memory_format = torch.channels_last
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    topk = min(topk, len(classes))
    source = ImageSource(images, classes, tf, batch_size, path_column=path_column, label_column=label_column)
    loader = DataLoader(source, batch_size=None, num_workers=workers, pin_memory=device == "cuda",
                        prefetch_factor=4 if workers else None)
    header = (["path", "true", "pred", "prob"] + [f"top{i + 1}" for i in range(topk)]
              + [f"prob{i + 1}" for i in range(topk)] + [f"p_{c}" for c in classes] + ["error"])
    counts = {"rows": 0, "labelled": 0, "correct": 0, "bad": 0}
    bad_examples: list[str] = []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for batch in loader:
                probs = None
                if batch["image"] is not None:
                    images = batch["image"].to(device, non_blocking=True)
                    probs = predict_logits(model, images, tta=tta, bf16=bf16).cpu()
                    top_p, top_i = probs.topk(topk, dim=1)
                j = 0
                for name, true, ok, err in zip(batch["name"], batch["true"], batch["ok"], batch["error"]):
                    if not ok:
                        counts["bad"] += 1
                        if len(bad_examples) < 3:
                            bad_examples.append(f"{printable(name)}: {err}")
                        w.writerow([escape_name(name), true, "", ""] + [""] * (2 * topk + len(classes)) + [err])
                        continue
                    p, tp, ti = probs[j], top_p[j], top_i[j]
                    j += 1
                    pred = classes[ti[0]]
                    if true:
                        counts["labelled"] += 1
                        counts["correct"] += int(true == pred)
                    w.writerow([escape_name(name), true, pred, f"{tp[0]:.6f}"] + [classes[i] for i in ti]
                               + [f"{v:.6f}" for v in tp] + [f"{v:.6f}" for v in p] + [""])
                counts["rows"] += len(batch["name"])

    atomic_write(out, write)
    acc = counts["correct"] / counts["labelled"] if counts["labelled"] else None
    if counts["bad"]:
        print(f"warning: {counts['bad']} unreadable image(s), listed in {out} with their error, e.g. "
              f"{'; '.join(bad_examples)}", file=sys.stderr)
    print(f"wrote {counts['rows']} predictions to {out}"
          + (f"; top-1 {acc:.4f} on {counts['labelled']} labelled readable images" if acc is not None else "")
          + (f" ({counts['bad']} unreadable)" if counts["bad"] else ""))
    return acc


def cli() -> None:
    """Console script ``finetune-predict`` (same as ``python launch/predict.py``)."""
    run_cli(main, prog="finetune-predict")


if __name__ == "__main__":
    run_cli(main)
