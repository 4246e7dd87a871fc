"""Loader throughput (decode + augment + collate, no model): WebDataset shards vs ImageFolder + PIL.

    python bench/data.py [--root /work/shared/data/hymenoptera_data] [--images 1000] [--workers 1,2]
                         [--upscale 4 --images 320]   # camera-sized photos (see below)

Both pipelines do RandomResizedCrop(224) + RandomHorizontalFlip and yield uint8 (B, 3, 224, 224)
batches of 32 through a torch DataLoader with the same worker count:

* shards: ``trainer.data.TrainLoader`` over shards written by ``trainer.data.shard_writer.write_shards``, with
  the trainer's training transform (``trainer.data.transforms.RandomResizedCropFlip.from_bytes``: the crop
  box drawn from the JPEG header, libjpeg-turbo decode through simplejpeg, at 1/2-1/8 size when the
  crop is at least twice the output, antialiased resize on the uint8 tensor);
* ImageFolder: ``torchvision.datasets.ImageFolder`` (PIL open + convert('RGB')), v2 transforms on the
  PIL image, ``PILToTensor`` at the end (no float conversion: same output as the shard loader).

``--upscale N`` first writes every training image N times larger (Lanczos, JPEG quality 90, 4:2:0
chroma, like a camera) to a temporary folder and benchmarks both pipelines on those: the case of
phone or camera photos, where reduced-size decoding pays most.

Prints images/s per pipeline and worker count (best of ``rounds`` alternating rounds, because
shared machines are noisy), and the ratio. The first batches (worker start-up) are not timed.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import fire
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2


from trainer.data.loader import TrainLoader  # noqa: E402
from trainer.data.meta import read_meta
from trainer.data.shard_writer import write_shards  # noqa: E402
from trainer.data.transforms import build_transforms  # noqa: E402

BATCH = 32
WARMUP_BATCHES = 2


def _rate(batches, num_batches: int) -> float:
    it = iter(batches)
    for _ in range(WARMUP_BATCHES):
        next(it)
    start, n = time.perf_counter(), 0
    for _ in range(num_batches):
        batch = next(it)
        n += (batch["image"] if isinstance(batch, dict) else batch[0]).shape[0]
    return n / (time.perf_counter() - start)


def _endless(loader):
    while True:
        yield from loader


def _upscaled_copy(root: Path, dest: Path, factor: int) -> Path:
    """``dest/train/<class>/*.jpg``: every decodable training image ``factor`` times larger (long side
    capped at 4032 px)."""
    for src in sorted((root / "train").glob("*/*")):
        try:
            with Image.open(src) as im:
                f = min(factor, 4032 / max(im.size))  # at most a 12-megapixel phone photo's long side
                big = im.convert("RGB").resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)
        except OSError:  # an unreadable file: left out of both pipelines
            continue
        out = dest / "train" / src.parent.name / (src.stem + ".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        big.save(out, "JPEG", quality=90, subsampling=2)
    return dest


def bench(root: str = "/work/shared/data/hymenoptera_data", images: int = 1000, workers: str | tuple | int = "1,2",
          shard_dir: str | None = None, rounds: int = 3, upscale: int = 1) -> dict:
    """Print and return {pipeline/workers: images per second}.

    Args:
        root: image folder with a ``train/<class>/`` split.
        images: images timed per pipeline and round (after 2 warm-up batches).
        workers: DataLoader worker counts to measure, e.g. "1,2".
        shard_dir: existing shards of ``root`` (default: written to a temporary folder).
        rounds: alternating rounds per worker count; the best round of each pipeline is kept.
        upscale: > 1 benchmarks on a copy of the training images this many times larger.
    """
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io deprecation notice
    if isinstance(workers, int):  # fire turns "--workers 1" into an int
        workers = (workers,)
    worker_counts = [int(w) for w in (workers.split(",") if isinstance(workers, str) else workers)]
    tmp = tempfile.TemporaryDirectory()
    if upscale > 1:
        if shard_dir is not None:
            raise ValueError("bench: --upscale writes its own images and shards; leave out --shard_dir")
        root = str(_upscaled_copy(Path(root), Path(tmp.name) / "images", upscale))
        print(f"upscaled x{upscale}: {root}")
    if shard_dir is None:
        shard_dir = str(Path(tmp.name) / "shards")
        write_shards(root, shard_dir, splits="train", max_samples_per_shard=64)
    shards = read_meta(shard_dir).shard_urls("train")
    num_batches = max(1, images // BATCH)
    pil_tf = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    folder = datasets.ImageFolder(str(Path(root) / "train"), transform=pil_tf)
    results = {}
    print(f"torch threads {torch.get_num_threads()}, batch {BATCH}, {num_batches} timed batches, "
          f"{len(shards)} shards")
    for w in worker_counts:
        best = {"shards": 0.0, "imagefolder": 0.0}
        for _ in range(rounds):  # alternate the two pipelines, keep the best round (noisy shared CPUs)
            loader = TrainLoader(shards, rank=0, world_size=1, micro_batch_size=BATCH, num_workers=w,
                                 transform=build_transforms(224, train=True), shuffle_buffer=100)
            best["shards"] = max(best["shards"], _rate(loader.epoch(0, num_batches + WARMUP_BATCHES), num_batches))
            loader.close()
            dl = DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=w, persistent_workers=w > 0)
            best["imagefolder"] = max(best["imagefolder"], _rate(_endless(dl), num_batches))
            del dl
        results[f"shards/{w}"], results[f"imagefolder/{w}"] = best["shards"], best["imagefolder"]
        print(f"workers={w}: shards {best['shards']:.0f} img/s, ImageFolder+PIL {best['imagefolder']:.0f} img/s, "
              f"ratio {best['shards'] / best['imagefolder']:.2f}x (best of {rounds})")
    tmp.cleanup()
    return results


if __name__ == "__main__":
    fire.Fire(bench)
