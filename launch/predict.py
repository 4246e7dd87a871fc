"""Classify a folder of images with a trained checkpoint and write a CSV.

    python launch/predict.py --checkpoint runs/ants_bees_lite0/checkpoints/best \
        --images ../shared/data/hymenoptera_data/val --out predictions.csv [--topk 2] [--tta]

The checkpoint (``model.safetensors`` + ``model.json``, see ``trainer/train/inference_checkpoint.py``)
is self-contained (weights, class names, backbone, preprocessing); nothing is downloaded. Every image
file below ``--images`` is classified (recursively, sorted). When an image's
parent folder is named like a class (e.g. ``val/ants/x.jpg``), that is taken as its true label and the
top-1 accuracy over those images is printed. Unreadable files are reported and listed in the CSV with
an empty prediction. ``--tta`` averages the softmax of the image and its horizontal flip.

CSV columns: path, true (or empty), pred, prob (of pred), top-k labels and probabilities
(``top1..topK``, ``prob1..probK``), then the probability of every class (``p_<class>``).
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import torch

from trainer.cli.errors import run_cli
from trainer.data.decode import decode_image_bytes
from trainer.data.transforms import build_transforms
from trainer.train.inference_checkpoint import load_for_inference
from trainer.utils.files import atomic_write

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(root: str | Path) -> list[Path]:
    """Image files below ``root`` (by suffix, hidden files skipped), sorted.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--images: no such file or folder: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


@torch.inference_mode()
def predict_logits(model, images: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
    """Class probabilities for a batch.

    Args:
        model: an :class:`trainer.models.classifier.ImageClassifier` (it normalises the images).
        images: (B, 3, H, W) uint8.
        tta: also run the horizontally flipped batch and average the softmax outputs.

    Returns:
        (B, C) float32 probabilities.
    """
    probs = model(images).float().softmax(dim=1)
    if tta:
        probs = (probs + model(images.flip(dims=[3])).float().softmax(dim=1)) / 2
    return probs


def main(checkpoint: str, images: str, out: str = "predictions.csv", batch_size: int = 32, topk: int = 1,
         tta: bool = False, device: str = "cpu") -> float | None:
    """Write predictions for every image below ``images`` to ``out``; return top-1 where labels are known.

    Args:
        checkpoint: the inference checkpoint folder (``<run>/checkpoints/best``), a file in it, the run
            folder, or a ``best.pt`` / ``last.pt`` (see ``trainer.train.inference_checkpoint.resolve``).
        images: an image file or a folder (searched recursively; class-named parent folders give labels).
        out: CSV file to write.
        batch_size: images per forward pass.
        topk: labels and probabilities per image in the CSV (at most the number of classes).
        tta: also classify the horizontally flipped image and average the softmax outputs.
        device: ``cpu`` or ``cuda``.
    """
    model, pre, classes = load_for_inference(checkpoint, device)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    topk = max(1, min(topk, len(classes)))
    paths = list_images(images)
    rows, correct, labelled = [], 0, 0

    def flush(batch_paths, batch_imgs):
        nonlocal correct, labelled
        probs = predict_logits(model, torch.stack(batch_imgs).to(device), tta=tta).cpu()
        top_p, top_i = probs.topk(topk, dim=1)
        for path, p, tp, ti in zip(batch_paths, probs, top_p, top_i):
            true = path.parent.name if path.parent.name in classes else ""
            pred = classes[ti[0]]
            if true:
                labelled += 1
                correct += int(true == pred)
            rows.append([str(path), true, pred, f"{tp[0]:.6f}"]
                        + [classes[i] for i in ti] + [f"{v:.6f}" for v in tp] + [f"{v:.6f}" for v in p])

    batch_paths, batch_imgs = [], []
    for path in paths:
        try:
            img = tf(decode_image_bytes(path.read_bytes()))
        except Exception as e:  # unreadable image: report, keep going
            print(f"warning: cannot read {path}: {e}", file=sys.stderr)
            rows.append([str(path), path.parent.name if path.parent.name in classes else "", "", ""]
                        + [""] * (2 * topk + len(classes)))
            continue
        batch_paths.append(path)
        batch_imgs.append(img)
        if len(batch_imgs) == batch_size:
            flush(batch_paths, batch_imgs)
            batch_paths, batch_imgs = [], []
    if batch_imgs:
        flush(batch_paths, batch_imgs)

    header = (["path", "true", "pred", "prob"] + [f"top{i + 1}" for i in range(topk)]
              + [f"prob{i + 1}" for i in range(topk)] + [f"p_{c}" for c in classes])
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write(out, buf.getvalue())
    acc = correct / labelled if labelled else None
    print(f"wrote {len(rows)} predictions to {out}" + (f"; top-1 {acc:.4f} on {labelled} labelled images"
                                                      if acc is not None else ""))
    return acc


def cli() -> None:
    """Console script ``finetune-predict`` (same as ``python launch/predict.py``)."""
    run_cli(main, prog="finetune-predict")


if __name__ == "__main__":
    run_cli(main)
