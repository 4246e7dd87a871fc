"""Fine-tuning throughput and achieved TFLOP/s on one accelerator: bf16 autocast + channels_last.

Usage::

    bench/gpu.sh                                   # on a GPU node: every model x source, < 5 minutes
    python bench/gpu.py --device cpu --steps 3 --batch 4 --models lite0   # smoke test on a CPU

For each model (``resnet50`` from torchvision with random weights, enough for throughput, and timm
``tf_efficientnet_lite0`` with the offline package weights) and each data source it times full
fine-tuning steps (forward, backward, AdamW step; every parameter trains) and prints images/s and
TFLOP/s:

* ``synthetic``: one random uint8 batch kept on the device (upper bound: no input pipeline);
* ``shards``: ``trainer.data.TrainLoader`` over the ants/bees shards (decode + RandomResizedCrop + flip
  in ``--workers`` loader processes, pinned memory, non-blocking copies), as ``trainer.train.loop`` feeds it.

The step is ``trainer.train.loop.train_step`` itself (uint8 batch normalised on the device, Accelerate
autocast in bf16, channels_last). FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode``
on one forward pass (it counts matmuls/convolutions as 2 FLOPs per multiply-add); a training step is
counted as 3x the forward (backward = 2x forward, the usual estimate, e.g. Kaplan et al. 2020). Timing
uses ``torch.cuda.synchronize()`` only at the ends of the timed window; ``--warmup`` steps (cuDNN
autotuning, allocator growth, ``torch.compile`` if ``--compile``) are excluded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from torch import nn  # noqa: E402

MODELS = {"resnet50": ("resnet50", "none"), "lite0": ("timm:tf_efficientnet_lite0", "package:efficientnet-lite0")}


def flops_per_image(model: nn.Module, size: int, device: torch.device) -> float:
    """Forward FLOPs of one ``(1, 3, size, size)`` image (``FlopCounterMode``; 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, size, size, device=device)
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was)
    return counter.get_total_flops() / 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, source: str, args, accelerator) -> dict:
    """Time ``args.steps`` fine-tuning steps of model ``name`` on ``source`` ('synthetic' or 'shards')."""
    from trainer.data.loader import TrainLoader
    from trainer.data.meta import read_meta
    from trainer.data.transforms import build_transforms
    from trainer.models.build import build_model
    from trainer.train.loop import train_step

    device = accelerator.device
    backbone, weights = MODELS[name]
    torch.manual_seed(0)
    model, pre = build_model(backbone, 2, weights, channels_last=True)
    model.to(device).train()
    fpi = flops_per_image(model, pre.input_size, device)
    if args.compile:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    criterion = nn.CrossEntropyLoss()
    b, s = args.batch, pre.input_size

    if source == "synthetic":
        fixed = {"image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device),
                 "label": torch.randint(0, 2, (b,), device=device)}

        def batches():
            while True:
                yield fixed
        stream = batches()
    else:
        meta = read_meta(args.shard_dir)
        tf = build_transforms(s, train=True, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
        loader = TrainLoader(meta.shard_urls("train"), rank=0, world_size=1, micro_batch_size=b,
                             num_workers=args.workers, transform=tf, resampled=True,
                             pin_memory=device.type == "cuda", num_classes=meta.num_classes,
                             prefetch_factor=4)
        stream = loader.epoch(0, args.warmup + args.steps)

    def step():
        return train_step(model, stream, optimizer=opt, criterion=criterion, accelerator=accelerator,
                          grad_accum_steps=1, grad_clip=None)

    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    loss = torch.zeros((), device=device)
    for _ in range(args.steps):
        loss += step()
    _sync(device)
    dt = time.perf_counter() - t0
    ips = args.steps * b / dt
    return {"model": name, "source": source, "images_per_s": ips, "gflops_per_image_fwd": fpi / 1e9,
            "tflops": ips * 3 * fpi / 1e12, "step_ms": 1000 * dt / args.steps, "loss": float(loss) / args.steps,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu (cpu: smoke test of the script)")
    ap.add_argument("--models", default="resnet50,lite0")
    ap.add_argument("--sources", default="synthetic,shards")
    ap.add_argument("--batch", type=int, default=128, help="images per step")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model and source")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--workers", type=int, default=12, help="loader processes for the shards source")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (model.compile)")
    ap.add_argument("--shard_dir", default=str(REPO / "data" / "shards" / "hymenoptera"))
    args = ap.parse_args()

    from accelerate import Accelerator
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device (use --device cpu --steps 3 for a smoke test)")
    if "shards" in args.sources and not (Path(args.shard_dir) / "dataset.json").is_file():
        from trainer.data.shard_writer import write_shards
        write_shards(REPO.parent / "shared" / "data" / "hymenoptera_data", args.shard_dir, max_samples_per_shard=64)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.precision)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev_name = torch.cuda.get_device_name(accelerator.device)
    else:
        dev_name = f"cpu ({torch.get_num_threads()} threads)"
    print(f"# bench/gpu.py device={dev_name} precision={args.precision} channels_last batch={args.batch} "
          f"steps={args.steps} warmup={args.warmup} compile={args.compile} torch={torch.__version__}", flush=True)
    print("| model | data | images/s | step ms | GFLOP/img (fwd) | TFLOP/s (3x fwd) | peak mem GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for source in args.sources.split(","):
            r = bench_one(name, source, args, accelerator)
            print(f"| {r['model']} | {r['source']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
                  f"{r['gflops_per_image_fwd']:.2f} | {r['tflops']:.2f} | {r['peak_mem_gb']:.1f} |", flush=True)
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(accelerator.device)


if __name__ == "__main__":
    main()
