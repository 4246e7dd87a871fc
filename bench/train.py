"""Training throughput of this trainer vs a plain PyTorch loop, side by side on this machine.

Usage (from the repository root; about 10-15 minutes on 2 CPU cores)::

    .venv/bin/python bench/train.py                      # throughput table + feature-cache table
    .venv/bin/python bench/train.py --rounds 2 --steps 24 --no-cache   # throughput only, 2 rounds

What is compared (same machine, same run of this script):

* **plain**: the PyTorch transfer-learning tutorial's loop
  (https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html): ``torchvision.datasets.ImageFolder``
  + PIL + ``transforms.RandomResizedCrop/RandomHorizontalFlip/ToTensor/Normalize`` in the DataLoader
  workers, NCHW float32, ``model.train()``, a hand-written AdamW step, ``loss.item()`` every step.
  Feature extraction = ``requires_grad=False`` on the backbone and AdamW over the head only.
* **trainer**: ``trainer.train.trainer.run`` itself (``configs/ants_bees_lite0.yaml``; shards written from the same
  images), with its defaults (channels_last, uint8 batches normalised in the loop, frozen backbone under
  ``torch.no_grad()``); ``trainer (bf16)`` adds ``train.mixed_precision=bf16``.

Both use the same backbone (timm tf_efficientnet_lite0 with the offline weights, ``build_model(
"timm:tf_efficientnet_lite0", 2, "package:efficientnet-lite0")``), the ants/bees training images, batch
size (``--batch``, one micro-batch per step), image size 224 with the same RandomResizedCrop + flip
(the backbone's bicubic interpolation), the same number of DataLoader workers and of steps.

Every variant runs in its own subprocess (so peak memory is its own). Steady state: the first
``--warmup`` steps, and the first step of every later epoch (which includes evaluation, checkpoints and
the loader restart), are excluded; the rest are timed step end to step end (so the time between steps,
e.g. logging and preemption checks, counts). Reported per variant (median over ``--rounds``, rounds
interleaved so a noisy neighbour hits every variant alike):

* ``img/s``: samples / wall-clock seconds of the timed steps;
* ``img/cpu-s``: samples / CPU seconds of the process and its loader workers over the same window
  (robust to other processes competing for the cores);
* ``data wait``: fraction of step time spent blocked in ``next()`` on the loader;
* ``RSS main``: peak resident memory of the training process (``ru_maxrss``); ``PSS tree``: peak of
  the proportional set size summed over the process and its workers (psutil, sampled every 0.5 s).

The feature-cache table runs the trainer with ``data.augment=none`` for ``--cache-epochs`` epochs with and
without ``train.feature_cache`` and reports the wall time of each epoch (from the end of one
evaluation to the end of the next, so checkpoints, training and evaluation all count) and val top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_ROOT = Path(os.environ.get("BENCH_DATA_ROOT", REPO.parent / "shared" / "data" / "hymenoptera_data"))
CONFIG = REPO / "configs" / "ants_bees_lite0.yaml"
BACKBONE, WEIGHTS = "timm:tf_efficientnet_lite0", "package:efficientnet-lite0"


# ---------------------------------------------------------------------------------------------
# measurement helpers (run inside the child process)


class _MemorySampler:
    """Peak PSS (bytes) of this process plus its children, sampled in a thread every ``interval`` s."""

    def __init__(self, interval: float = 0.5):
        import psutil
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that just exited
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _tree_cpu_seconds() -> float:
    """user + system CPU seconds of this process and its live children (the loader workers)."""
    import psutil
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:
            pass
    return total


class StepTimer:
    """Step-end timestamps, data-wait time per step and CPU time, with epoch boundaries marked."""

    def __init__(self):
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.waits: list[float] = []
        self.samples: list[int] = []
        self.first_of_epoch: list[bool] = []
        self._new_epoch = True
        self.eval_ends: list[float] = []
        self.top1: list[float] = []
        self.first_start: float | None = None

    def timed(self, it):
        """Wrap an iterator so the time spent in ``next()`` is added to the current step's wait."""
        timer = self

        class _It:
            def __iter__(self):
                return self

            def __next__(self):
                t = time.perf_counter()
                b = next(it)
                timer._wait += time.perf_counter() - t
                timer._n += len(b["label"]) if isinstance(b, dict) else len(b[1])
                return b
        self._wait, self._n = 0.0, 0
        return _It()

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(_tree_cpu_seconds())
        self.waits.append(self._wait)
        self.samples.append(self._n)
        self.first_of_epoch.append(self._new_epoch)
        self._new_epoch = False

    def epoch_boundary(self) -> None:
        self._new_epoch = True

    def summary(self, warmup: int) -> dict:
        """Steady-state figures over steps ``> warmup`` that are not the first of an epoch."""
        dt = cpu = wait = 0.0
        n = steps = 0
        for i in range(max(1, warmup), len(self.ends)):
            if self.first_of_epoch[i]:
                continue
            dt += self.ends[i] - self.ends[i - 1]
            cpu += self.cpu[i] - self.cpu[i - 1]
            wait += self.waits[i]
            n += self.samples[i]
            steps += 1
        if steps == 0:
            raise RuntimeError(f"no steady-state step to time ({len(self.ends)} steps, warmup {warmup})")
        return {"steps": steps, "samples": n, "seconds": dt, "images_per_s": n / dt,
                "images_per_cpu_s": n / cpu if cpu > 0 else float("nan"), "data_wait": wait / dt}


# ---------------------------------------------------------------------------------------------
# the two implementations


def run_plain(mode: str, args) -> StepTimer:
    """The tutorial loop. ``mode``: 'fe' (feature extraction) or 'ft' (full fine-tuning)."""
    import torch
    from torchvision import datasets, transforms

    from trainer.models.build import build_model

    torch.manual_seed(0)
    model, pre = build_model(BACKBONE, 2, WEIGHTS)
    interp = transforms.InterpolationMode(pre.interpolation)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(pre.input_size, interpolation=interp),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])
    ds = datasets.ImageFolder(str(DATA_ROOT / "train"), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    if mode == "fe":
        for p in model.backbone.parameters():
            p.requires_grad = False
        params = list(model.head.parameters())
    else:
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    timer = StepTimer()
    step = 0
    while step < args.steps:
        timer.epoch_boundary()
        it = iter(loader)
        while step < args.steps:
            timed = timer.timed(it)
            try:
                inputs, labels = next(timed)
            except StopIteration:
                break
            optimizer.zero_grad()
            # the tutorial's model(inputs); written out so the trainer's no_grad path is not used here
            outputs = model.head(model.head_drop(model.forward_features(inputs)))
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            _ = loss.item() * inputs.size(0)  # the tutorial's running_loss
            step += 1
            timer.step_done()
    return timer


def run_trainer(mode: str, args, *, extra: dict | None = None, full_val: bool = False) -> tuple[StepTimer, object]:
    """``trainer.train.trainer.run`` on the shards of the same images, instrumented from outside."""
    import trainer.train.trainer as run_mod
    from trainer.config.loading import load_config

    timer = StepTimer()
    orig_step, orig_eval = run_mod.train_step, run_mod.evaluate

    def train_step(model, micro_batches, **kw):
        if timer.first_start is None:
            timer.first_start = time.perf_counter()
        out = orig_step(model, timer.timed(iter(micro_batches)), **kw)
        timer.step_done()
        return out

    def evaluate(*a, **kw):
        res = orig_eval(*a, **kw)
        timer.eval_ends.append(time.perf_counter())
        timer.top1.append(float(res.top1))
        timer.epoch_boundary()
        return res

    run_mod.train_step, run_mod.evaluate = train_step, evaluate
    out_dir = tempfile.mkdtemp(prefix="bench_trainer_")
    shard_dir = Path(args.shard_dir)
    epochs = -(-args.steps // -(-args.train_samples // args.batch))  # ceil(steps / steps_per_epoch)
    overrides = {
        "data.root": str(DATA_ROOT), "data.shard_dir": str(shard_dir), "data.num_workers": args.workers,
        "train.micro_batch_size": args.batch, "train.global_batch_size": args.batch,
        "train.eval_batch_size": args.batch,
        "train.epochs": epochs, "train.max_steps": args.steps, "train.output_dir": out_dir,
        "logging.wandb": "disabled", "logging.progress": False,
        "finetune.freeze": "backbone" if mode == "fe" else "none",
    }
    if not full_val:  # evaluation is not timed: one val shard keeps the run short
        overrides["data.val_shards"] = str(shard_dir / "val-000000.tar")
    overrides.update(extra or {})
    cfg = load_config(CONFIG, overrides)
    result = run_mod.run(cfg)
    return timer, result


def child(args) -> None:
    """Run one variant and print one JSON line with its figures."""
    import torch
    impl, mode = args.child.split(":")[:2]
    precision = args.child.split(":")[2] if args.child.count(":") >= 2 else "fp32"
    with _MemorySampler() as mem:
        if impl == "plain":
            timer = run_plain(mode, args)
        else:
            extra = {"train.mixed_precision": "bf16"} if precision == "bf16" else {}
            timer, _ = run_trainer(mode, args, extra=extra)
    out = timer.summary(args.warmup)
    out.update(variant=args.child, rss_main_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               pss_tree_mb=mem.peak / 2**20, torch_threads=torch.get_num_threads())
    print("BENCH_JSON " + json.dumps(out), flush=True)


def child_cache(args) -> None:
    """Trainer with data.augment=none, feature cache on or off: epoch wall times and val top-1."""
    on = args.child_cache == "on"
    timer, result = run_trainer("fe", args, full_val=True, extra={
        "data.augment": "none", "train.feature_cache": on, "train.epochs": args.cache_epochs,
        "train.max_steps": None, "train.micro_batch_size": 8, "train.global_batch_size": 16})
    ends = timer.eval_ends
    epoch_s = [ends[0] - timer.first_start] + [b - a for a, b in zip(ends, ends[1:])]
    print("BENCH_JSON " + json.dumps({"cache": on, "epoch_seconds": epoch_s, "top1": timer.top1,
                                      "best_top1": result.best_top1}), flush=True)


# ---------------------------------------------------------------------------------------------
# orchestration


def _spawn(argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _ensure_shards(shard_dir: Path) -> int:
    from trainer.data.meta import read_meta
    from trainer.data.shard_writer import write_shards
    if not (shard_dir / "dataset.json").is_file():
        write_shards(DATA_ROOT, shard_dir, max_samples_per_shard=64)
    return read_meta(shard_dir).splits["train"].num_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per variant (16 = 1 epoch at batch 16)")
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded at the start")
    ap.add_argument("--batch", type=int, default=16, help="batch size (one micro-batch per step)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (both implementations)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the median is reported")
    ap.add_argument("--variants", default="plain:fe,trainer:fe,trainer:fe:bf16,plain:ft,trainer:ft,trainer:ft:bf16")
    ap.add_argument("--cache-epochs", type=int, default=3, help="epochs of the feature-cache comparison")
    ap.add_argument("--no-cache", action="store_true", help="skip the feature-cache comparison")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--shard_dir", default=str(REPO / "data" / "shards" / "hymenoptera"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant subprocess")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child_cache", help=argparse.SUPPRESS)
    ap.add_argument("--train_samples", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child or args.child_cache:
        import logging
        logging.disable(logging.INFO)
        (child if args.child else child_cache)(args)
        return

    n_train = _ensure_shards(Path(args.shard_dir))
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--workers", str(args.workers), "--shard_dir", args.shard_dir, "--train_samples", str(n_train),
              "--cache-epochs", str(args.cache_epochs)]
    print(f"# bench/train.py  cores={os.cpu_count()} load avg={os.getloadavg()[0]:.1f}  batch={args.batch} "
          f"workers={args.workers} steps={args.steps} (warmup {args.warmup}) rounds={args.rounds}", flush=True)

    if not args.no_throughput:
        variants = args.variants.split(",")
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                res = _spawn(["--child", v, *common], args.timeout)
                results[v].append(res)
                print(f"  round {r + 1} {v:18s} {res['images_per_s']:6.1f} img/s  "
                      f"{res['images_per_cpu_s']:5.1f} img/cpu-s  wait {res['data_wait']:.0%}", flush=True)
        med = {v: {k: statistics.median(x[k] for x in rs) for k in
                   ("images_per_s", "images_per_cpu_s", "data_wait", "rss_main_mb", "pss_tree_mb", "steps")}
               for v, rs in results.items()}
        print()
        print("| variant | mode | img/s | img/cpu-s | vs plain (img/s) | vs plain (img/cpu-s) | data wait "
              "| RSS main MB | PSS tree MB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for v in variants:
            impl, mode = v.split(":")[:2]
            name = impl + (" (bf16)" if v.endswith(":bf16") else "")
            base = med.get(f"plain:{mode}")
            m = med[v]
            rel = (f"{m['images_per_s'] / base['images_per_s']:.2f}x", f"{m['images_per_cpu_s'] / base['images_per_cpu_s']:.2f}x") \
                if base else ("-", "-")
            print(f"| {name} | {'feature extraction' if mode == 'fe' else 'fine-tuning'} | "
                  f"{m['images_per_s']:.1f} | {m['images_per_cpu_s']:.1f} | {rel[0]} | {rel[1]} | "
                  f"{m['data_wait']:.0%} | {m['rss_main_mb']:.0f} | {m['pss_tree_mb']:.0f} |")
        for impl, suffix in (("plain", ""), ("trainer", ""), ("trainer (bf16)", ":bf16")):
            name = impl.split()[0]
            fe, ft = med.get(f"{name}:fe{suffix}"), med.get(f"{name}:ft{suffix}")
            if fe and ft:
                print(f"feature extraction / fine-tuning ({impl}): {fe['images_per_s'] / ft['images_per_s']:.2f}x")
        print(flush=True)

    if not args.no_cache:
        off = _spawn(["--child_cache", "off", *common], args.timeout)
        on = _spawn(["--child_cache", "on", *common], args.timeout)
        print("| feature cache | epoch 0 s | later epochs s (each) | mean later epoch s | val top-1 per epoch | best |")
        print("|---|---:|---|---:|---|---:|")
        for r in (off, on):
            later = r["epoch_seconds"][1:]
            print(f"| {'on' if r['cache'] else 'off'} | {r['epoch_seconds'][0]:.1f} | "
                  f"{', '.join(f'{x:.2f}' for x in later)} | {statistics.mean(later):.2f} | "
                  f"{', '.join(f'{x:.4f}' for x in r['top1'])} | {r['best_top1']:.4f} |")
        print(f"later epochs with the cache: {statistics.mean(off['epoch_seconds'][1:]) / statistics.mean(on['epoch_seconds'][1:]):.1f}x faster")


if __name__ == "__main__":
    main()
