"""Benchmark: input resolution against accuracy and time, by the linear probe on a frozen backbone.

For each size S in ``--sizes``, the backbone (EfficientNet-Lite0, offline ImageNet weights) runs once in
eval mode over the train, val (and test, when there are shards for it) splits with the trainer's eval
transform at S (resize the short side to ``S / crop_pct``, centre-crop S: small images such as
EuroSAT's 64x64 are upsampled), then :func:`trainer.finetune.linear_probe.fit_linear_probe` solves the head
with the L2 strength chosen on val. The same code paths as ``finetune.strategy: linear_probe``
(:func:`trainer.train.probe_stage.extract_features`); only the loader set-up is local.

Printed per size: images/s of the feature pass, its seconds, fit seconds, chosen L2, val and test
top-1. Wall-clock figures on a shared machine: the 1-minute load average is printed beside them.

With ``--model_rates`` it measures instead, per size, the model alone on synthetic images (no data, no
probe): fine-tuning images/s (forward + backward + AdamW step, train mode, batch ``--batch``) and
inference images/s (eval forward), the ceiling of what a run at that size can reach on this machine.

Usage::

    python bench/resolution.py --shard_dir data/shards/eurosat --sizes 224,128,64 --bf16
    python bench/resolution.py --model_rates --sizes 64,96,128,160,224 --batch 32
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from trainer.config.schema import Config  # noqa: E402
from trainer.data.loader import EvalLoader  # noqa: E402
from trainer.data.transforms import build_transforms  # noqa: E402
from trainer.models.build import build_model  # noqa: E402
from trainer.selection.measure import measure_cost  # noqa: E402
from trainer.finetune.linear_probe import fit_linear_probe  # noqa: E402
from trainer.train.probe_stage import extract_features  # noqa: E402


class _Cpu:
    """The few Accelerator members :func:`extract_features` uses, for one CPU process."""

    device, num_processes, is_main_process = torch.device("cpu"), 1, True

    def __init__(self, bf16: bool):
        self.bf16 = bf16

    def autocast(self):
        return torch.autocast("cpu", torch.bfloat16, enabled=self.bf16)


def measure(shard_dir: str, size: int, *, bf16: bool, batch: int, workers: int, backbone: str, weights: str,
            l2_grid: list[float]) -> dict:
    """Features at ``size`` for every split with shards in ``shard_dir``, then the probe; returns the figures."""
    shards = {s: sorted(glob.glob(os.path.join(shard_dir, f"{s}-*.tar"))) for s in ("train", "val", "test")}
    classes = json.loads((Path(shard_dir) / "dataset.json").read_text())["classes"]
    model, pre = build_model(backbone, len(classes), weights, channels_last=True)
    tf = build_transforms(size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    feats, n_img, t_feat = {}, 0, 0.0
    for split, files in shards.items():
        if not files:
            continue
        t0 = time.perf_counter()
        loader = EvalLoader(files, rank=0, world_size=1, micro_batch_size=batch, num_workers=workers, transform=tf)
        x, y, _ = extract_features(model, loader, accelerator=_Cpu(bf16))
        t_feat += time.perf_counter() - t0
        n_img += len(y)
        feats[split] = (x, y)
    res = fit_linear_probe(*feats["train"], *feats["val"], num_classes=len(classes), l2_grid=l2_grid)
    out = {"size": size, "bf16": bf16, "images": n_img, "feature_s": t_feat, "images_per_s": n_img / t_feat,
           "fit_s": res.seconds, "l2": res.l2, "val_top1": res.val_top1, "test_top1": None,
           "load_avg": os.getloadavg()[0]}
    if "test" in feats:
        xs, ys = feats["test"]
        out["test_top1"] = ((xs @ res.weight.T + res.bias).argmax(1) == ys).double().mean().item()
    return out


def model_rates(size: int, *, batch: int, backbone: str, steps: int = 4) -> dict:
    """Images/s of the model alone at input ``size``: fine-tuning (forward + backward + AdamW) and inference,
    measured by :func:`trainer.selection.measure.measure_cost` (synthetic images, random weights, 10 classes,
    one warm-up step, then ``steps`` timed ones; single process, torch's own thread count)."""
    cost = measure_cost(backbone, "none", num_classes=10, batch_size=batch, device=torch.device("cpu"),
                        steps=steps, input_size=size)
    return {"size": size, "train_images_per_s": cost.train_img_s, "infer_images_per_s": cost.infer_img_s,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: see the module docstring. Prints one line per size and a JSON list at the end."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard_dir", default=None, help="folder with {train,val[,test]}-*.tar and dataset.json")
    ap.add_argument("--sizes", default="224,160,128", help="comma-separated input sizes S")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the feature pass")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--model_rates", action="store_true",
                    help="model-alone fine-tuning / inference images/s per size (no data needed)")
    args = ap.parse_args(argv)
    cfg = Config()
    rows = []
    if args.model_rates:
        for s in (int(v) for v in args.sizes.split(",")):
            r = model_rates(s, batch=args.batch, backbone=cfg.model.backbone)
            rows.append(r)
            print(f"S={s:4d}  fine-tuning {r['train_images_per_s']:7.1f} img/s  inference {r['infer_images_per_s']:7.1f} "
                  f"img/s  (batch {args.batch}, {r['threads']} threads)", flush=True)
        return rows
    if args.shard_dir is None:
        ap.error("--shard_dir is required (except with --model_rates)")
    for s in (int(v) for v in args.sizes.split(",")):
        r = measure(args.shard_dir, s, bf16=args.bf16, batch=args.batch, workers=args.workers,
                    backbone=cfg.model.backbone, weights=cfg.model.weights, l2_grid=cfg.finetune.lp_l2_grid)
        rows.append(r)
        test = "-" if r["test_top1"] is None else f"{r['test_top1']:.4f}"
        print(f"S={s:4d}  features {r['images']} img in {r['feature_s']:.0f} s ({r['images_per_s']:.1f} img/s)  "
              f"fit {r['fit_s']:.1f} s  l2 {r['l2']:.0e}  val top-1 {r['val_top1']:.4f}  test top-1 {test}  "
              f"load {r['load_avg']:.1f}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
