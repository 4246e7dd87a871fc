"""Scale benchmark: how the run's bookkeeping, data path and memory grow with images (N) and classes (C).

    python bench/scale.py metrics [--classes 10,100,1000,10000] [--val 50000]
    python bench/scale.py run --size 10k  [--classes 10,1000,10000] [--steps 200] [--work /tmp/scale_bench]
    python bench/scale.py run --size 100k --classes 10,10000
    python bench/scale.py run --size 1m   --classes 10 --direct --load_images 200000

``metrics``: one evaluation's bookkeeping at C classes over ``--val`` samples with random logits, in
this process: accumulator memory (``EvalAccumulator``: 3 x C counts + 8 bytes per sample; the
collector's top-5 per sample), bytes of the ``metrics.jsonl`` evaluation line, and bytes of the
per-evaluation report files (``reports/latest/val_per_class.csv``, ``val_confused_pairs.csv``).

``run --size N``: a synthetic image folder of N training images (32x32 JPEGs, class-tinted noise,
label ``i % C``) plus N/20 validation images, then for each C (its own folder):

1. shard writing images/s with 1 and 2 writer processes (``trainer.data.shard_writer.write_shards``);
2. loader images/s: one pass over the training shards with ``trainer.data.loader.TrainLoader``
   (2 workers, the training transform at 32 px, micro-batches of 64);
3. a short training run (``trainer.train.start.run``): ``timm:test_efficientnet`` (99k
   parameters, random weights, backbone frozen) at 32 px instead of its 160 px (the bench patches the
   preprocessing: only the bookkeeping is under test here), global batch 32, ``--steps`` steps, one
   evaluation at the end, W&B off;

``--direct`` skips the image folder and the shard writer (steps 1 above): the same synthetic samples
are written straight into shards of 5,000 (a pool of 64 encoded JPEGs per class, unique keys), so the
loader and the trainer can be measured at 1M images without 1M files on disk and ~40 minutes of
writing on 2 cores. ``--load_images`` caps the loader pass (default: one whole epoch).

The run prints peak RSS of every process (each phase runs in a child process that reports its own peak,
``getrusage(RUSAGE_SELF)``, and the largest RSS any of its worker processes reached, polled with
psutil) and the bytes of the run's
``metrics.jsonl`` evaluation line. One JSON line per measurement goes to stdout and
``<work>/results.jsonl``. Timings on a shared machine vary: take them as rates, not targets.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}


def _emit(work: Path | None, rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if work is not None:
        with open(work / "results.jsonl", "a") as f:
            f.write(line + "\n")


def _ints(v) -> list[int]:
    """``10,1000`` as fire passes it (int, tuple or string) -> ``[10, 1000]``."""
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(x) for x in str(v).split(",")]


def _maxrss_self_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(phase: str, **kw) -> dict:
    """Run ``bench/scale.py _<phase>`` in a child process; its JSON result plus its peak RSS (MB)."""
    args = [sys.executable, str(Path(__file__).resolve()), f"_{phase}"] + [f"--{k}={v}" for k, v in kw.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"phase {phase} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class _ChildPeak:
    """Largest RSS of any child process (writer / loader workers) while the phase runs, polled every
    0.2 s with psutil. (``getrusage(RUSAGE_CHILDREN)`` would also count a short-lived child that
    ``import torch`` starts, larger than the workers.)"""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.2):
            for ch in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, ch.memory_info().rss)
                except psutil.Error:
                    pass


_PEAK: _ChildPeak | None = None


def _result(**rec) -> None:
    """A phase's last stdout line: its figures, its own peak RSS (``getrusage``) and its workers' (polled)."""
    rec.update(peak_rss_mb=round(_maxrss_self_mb(), 1),
               workers_peak_rss_mb=round(_PEAK.peak / 2**20, 1) if _PEAK is not None else None)
    print(json.dumps(rec), flush=True)


# ---------------------------------------------------------------------------------------------
# metrics at C classes (in process)


def metrics(classes: str = "10,100,1000,10000", val: int = 50_000, batch: int = 500, seed: int = 0) -> None:
    """Bookkeeping of one evaluation at each C: memory, metrics.jsonl line bytes, report file bytes."""
    import tempfile
    import tracemalloc

    import torch

    from trainer.reporting.metrics import EvalAccumulator
    from trainer.reporting.predictions import PredictionCollector
    from trainer.reporting.reporter import Reporter
    from trainer.reporting.tracking import Tracker

    class Main:
        num_processes, is_main_process = 1, True

    for c in _ints(classes):
        g = torch.Generator().manual_seed(seed)
        acc, col = EvalAccumulator(c), PredictionCollector(num_mistakes=16)
        tracemalloc.start()
        t0 = time.perf_counter()
        for s in range(0, val, batch):
            b = min(batch, val - s)
            labels = torch.randint(0, c, (b,), generator=g)
            logits = torch.randn(b, c, generator=g)
            logits[torch.arange(b), labels] += 3.0  # ~half right at C = 1000
            acc.update(logits, labels)
            col({"key": [f"val/{s + i:07d}" for i in range(b)], "label": labels,
                 "image": torch.zeros(b, 3, 32, 32, dtype=torch.uint8)}, logits)
        res = acc.reduce()
        state = acc.counts.numel() * 8 + sum(t.numel() * 8 for t in acc.cells)
        loc = col.local()
        collector = sum(v.nbytes for v in loc.values() if isinstance(v, np.ndarray))
        eval_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            tr = Tracker(d, {}, mode="disabled")
            tr.log(res.as_log("val/"), step=1)
            tr.close()
            line = (Path(d) / "metrics.jsonl").stat().st_size
            rep = Reporter(d, [f"class_{i:05d}" for i in range(c)], Main(), Tracker.disabled())
            t1 = time.perf_counter()
            rep.after_eval(res, col, improved=False, step=1)
            tables_s = time.perf_counter() - t1
            files = {p.name: p.stat().st_size for p in (Path(d) / "reports/latest").iterdir()}
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        _emit(None, {"bench": "metrics", "classes": c, "val_samples": val, "metrics_line_bytes": line,
                     "accumulator_bytes": state, "collector_topk_bytes": collector,
                     "python_peak_alloc_mb": round(peak / 1e6, 1), "per_class_csv_bytes": files["val_per_class.csv"],
                     "confused_pairs_csv_bytes": files["val_confused_pairs.csv"],
                     "confused_pairs": int(len(res.confused)), "dense_confusion_would_be_bytes": 8 * c * c,
                     "eval_update_s": round(eval_s, 2), "tables_s": round(tables_s, 3)})


# ---------------------------------------------------------------------------------------------
# synthetic data, shards, loader, training (each phase in a child process)


def _gen(root: str, n: int, classes: int, seed: int = 0) -> None:
    """``root/{train,val}/c<label>/<i>.jpg``: n training and n // 20 validation 32x32 JPEGs."""
    import simplejpeg

    root_p = Path(root)
    rng = np.random.default_rng(seed)
    tints = rng.integers(30, 226, (classes, 3))
    t0 = time.perf_counter()
    for split, count in (("train", n), ("val", max(n // 20, 1))):
        made = set()
        for i in range(count):
            label = i % classes
            d = root_p / split / f"c{label:05d}"
            if label not in made:
                d.mkdir(parents=True, exist_ok=True)
                made.add(label)
            img = np.clip(tints[label] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            (d / f"{i:07d}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=90))
    _result(images=n + max(n // 20, 1), seconds=round(time.perf_counter() - t0, 1))


def _direct(out: str, n: int, classes: int, seed: int = 0, per_shard: int = 5000, pool: int = 64) -> None:
    """Shards of n training and n // 20 validation samples written straight (no image folder, no checks):
    the layout and ``dataset.json`` of :func:`trainer.data.shard_writer.write_shards`, ``pool`` distinct
    JPEGs per class (the samples of a class reuse them under their own keys)."""
    import simplejpeg
    import webdataset as wds

    from trainer.data.meta import META_NAME, build_meta, write_meta

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tints = rng.integers(30, 226, (classes, 3))
    jpegs = [[simplejpeg.encode_jpeg(np.clip(tints[c] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8),
                                     quality=90) for _ in range(pool)] for c in range(classes)]
    t0, splits = time.perf_counter(), {}
    for split, count in (("train", n), ("val", max(n // 20, 1))):
        names, sizes, counts = [], [], [0] * classes
        for start in range(0, count, per_shard):
            names.append(f"{split}-{len(names):06d}.tar")
            sizes.append(min(per_shard, count - start))
            with wds.TarWriter(str(out_p / names[-1]), encoder=False, mtime=0, format="PAX_FORMAT") as w:
                for i in range(start, start + sizes[-1]):
                    label = i % classes
                    counts[label] += 1
                    w.write({"__key__": f"{split}/{i:08d}", "jpg": jpegs[label][(i // classes) % pool],
                             "cls": str(label).encode()})
        splits[split] = {"num_samples": count, "num_shards": len(names), "class_counts": counts, "shards": names,
                         "shard_sizes": sizes, "num_skipped": 0, "skipped": []}
    write_meta(out_p / META_NAME, build_meta([f"c{c:05d}" for c in range(classes)], splits))
    total = n + max(n // 20, 1)
    dt = time.perf_counter() - t0
    _result(images=total, seconds=round(dt, 1), images_per_s=round(total / dt))


def _write(root: str, out: str, workers: int) -> None:
    from trainer.data.shard_writer import write_shards

    t0 = time.perf_counter()
    meta = write_shards(root, out, num_workers=workers, max_samples_per_shard=5000, overwrite=True)
    dt = time.perf_counter() - t0
    n = sum(s["num_samples"] for s in meta["splits"].values())
    _result(images=n, seconds=round(dt, 1), images_per_s=round(n / dt))


def _load(shards: str, workers: int = 2, batch: int = 64, images: int = 0) -> None:
    from trainer.data.loader import TrainLoader
    from trainer.data.meta import read_meta
    from trainer.data.transforms import build_transforms

    meta = read_meta(Path(shards) / "dataset.json")
    n = meta.splits["train"].num_samples
    tf = build_transforms(32, train=True, crop_pct=1.0, interpolation="bilinear", augment="standard")
    loader = TrainLoader(meta.shard_urls("train"), micro_batch_size=batch, transform=tf, seed=0, rank=0,
                         world_size=1, num_workers=workers, num_classes=len(meta.classes))
    steps = (min(n, images) if images > 0 else n) // batch
    it = iter(loader.epoch(0, steps))
    next(it)  # worker start-up not timed
    t0, seen = time.perf_counter(), 0
    for b in it:
        seen += b["image"].shape[0]
    dt = time.perf_counter() - t0
    _result(images=seen, seconds=round(dt, 1), images_per_s=round(seen / dt))


def _train(shards: str, out: str, steps: int) -> None:
    import dataclasses
    import logging

    import trainer.train.components as tt  # where the Trainer's model is built
    from trainer.train.start import run
    from trainer.config.loading import load_config

    real_build = tt.build_model

    def build_32px(*a, **kw):  # low resolution: the bookkeeping is under test, not the model
        model, pre = real_build(*a, **kw)
        return model, dataclasses.replace(pre, input_size=32, crop_pct=1.0)

    tt.build_model = build_32px
    cfg = load_config(None, {
        "data.shard_dir": shards, "data.num_workers": 2, "data.shuffle_buffer": 1000,
        "model.backbone": "timm:test_efficientnet", "model.weights": "none", "model.channels_last": False,
        "train.output_dir": out, "train.epochs": 1, "train.max_steps": steps, "train.global_batch_size": 32,
        "train.micro_batch_size": 32, "train.eval_batch_size": 256, "train.log_every_steps": 50,
        "train.resume": False, "optim.warmup_steps": 0, "logging.wandb": "disabled", "logging.progress": False})
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    res = run(cfg)
    dt = time.perf_counter() - t0
    evals = [line for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"val/top1"' in line]
    _result(steps=res.step, seconds=round(dt, 1), steps_per_s=round(res.step / dt, 2),
            eval_line_bytes=max(len(e) + 1 for e in evals),
            reports_latest_bytes=sum(p.stat().st_size for p in (Path(out) / "reports/latest").iterdir()))


def run(size: str = "10k", classes: str = "10,1000,10000", steps: int = 200, work: str = "/tmp/scale_bench",
        keep: bool = False, direct: bool = False, load_images: int = 0) -> None:
    """Generate, shard (1 and 2 writers), load and train at ``size`` for each C; print one JSON line per phase.

    ``direct``: write the shards straight (``_direct``) instead of generating and sharding a folder;
    ``load_images`` > 0: the loader pass reads that many training images instead of one epoch."""
    import shutil

    n = SIZES[str(size).lower()] if str(size).lower() in SIZES else int(size)  # an int: smoke tests
    work_p = Path(work)
    work_p.mkdir(parents=True, exist_ok=True)
    for c in _ints(classes):
        base = work_p / f"{size}_c{c}"
        shutil.rmtree(base, ignore_errors=True)
        common = {"bench": "run", "size": n, "classes": c}
        if direct:
            _emit(work_p, {**common, "phase": "direct_shards", **_child("direct", out=base / "shards_w2", n=n,
                                                                          classes=c)})
        else:
            _emit(work_p, {**common, "phase": "generate", **_child("gen", root=base / "images", n=n, classes=c)})
            for w in (1, 2):
                shard_dir = base / f"shards_w{w}"
                _emit(work_p, {**common, "phase": f"write_shards_{w}proc",
                               **_child("write", root=base / "images", out=shard_dir, workers=w)})
        _emit(work_p, {**common, "phase": "loader", **_child("load", shards=base / "shards_w2", images=load_images)})
        _emit(work_p, {**common, "phase": "train",
                       **_child("train", shards=base / "shards_w2", out=base / "run", steps=steps)})
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # a phase: watch its worker processes
        _PEAK = _ChildPeak()
    fire.Fire({"metrics": metrics, "run": run, "_gen": _gen, "_direct": _direct, "_write": _write, "_load": _load,
               "_train": _train})
