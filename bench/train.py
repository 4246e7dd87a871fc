"""Training throughput of this trainer against its model's own limit and a plain PyTorch loop, side by side.

Usage (from the repository root; about 5 minutes on 2 CPU cores at the defaults)::

    .venv/bin/python bench/train.py                        # the throughput table (model alone / trainer / plain)
    .venv/bin/python bench/train.py --compile --no-throughput   # torch.compile: compile time and steady gain
    .venv/bin/python bench/train.py --cache --no-throughput     # the feature-cache table

Printed first: the CPU model and its matmul-relevant ISA flags (avx2, fma, avx512f, avx512_bf16,
amx_bf16), torch threads of the training process, loader workers (threads, nice), image size, batch.

Per variant (feature extraction ``fe`` and fine-tuning ``ft``; fp32 and bf16), in its own process:

* **model alone**: the same model (timm tf_efficientnet_lite0, offline weights, channels_last), same
  batch, same torch threads, synthetic ``uint8`` images (the model normalises them, as in the trainer),
  no data loading: feature extraction = eval-mode forward under ``torch.no_grad()``; fine-tuning =
  train-mode forward + backward + ``torch.optim.AdamW`` step. bf16 = ``torch.autocast("cpu", bfloat16)``.
  Warmed up until two consecutive blocks of at least 2 s agree within 3 %, then the mean of those two.
* **trainer**: ``trainer.train.start.run`` itself (``configs/ants_bees_lite0.yaml`` on shards of the
  ants/bees images, ``finetune.freeze`` backbone / none, ``train.mixed_precision`` no / bf16, batch
  ``--batch`` as one micro-batch per step, ``data.image_size`` ``--size``), timed from outside: step end to
  step end, so everything between steps counts. Steady state: the first ``--warmup`` steps and the first
  step of every later epoch (it includes evaluation, checkpoints, the loader restart) are excluded;
  ``stable`` compares the first and second half of the timed steps.
* **plain**: the PyTorch transfer-learning tutorial's loop
  (https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html): ``ImageFolder`` + PIL +
  ``RandomResizedCrop/RandomHorizontalFlip/ToTensor/Normalize`` in the DataLoader workers, NCHW float32,
  ``model.train()``, a hand-written AdamW step, ``loss.item()`` every step; feature extraction =
  ``requires_grad=False`` on the backbone. Same images, size, batch, workers and steps (fp32 only).

Columns: model-alone img/s; trainer img/s and its fraction of the model alone (target >= 0.85);
plain img/s and trainer / plain (targets: >= 2.5x feature extraction, >= 1.5x fine-tuning);
``img/cpu-s`` (samples / CPU seconds of the process and its workers: robust to other processes on the
cores); ``data wait`` (fraction of step time blocked on the loader); peak RSS of the process, peak PSS of
the process tree (sampled every 5 s: reading PSS costs ~30 ms of CPU per process).

``--compile`` adds, per ``--compile_variants`` (mode:precision), the model alone under ``model.compile()``:
compile time (first call minus a steady call), steady rate, gain over eager, and the break-even run
length (compile time / time saved per image); with ``--compile_trainer`` also the trainer's steady rate
with ``model.compile=true`` (evaluation and the last partial batch compile again, inside the excluded
steps, so the trainer's own start-up costs more than the model's compile time).

``--cache``: the trainer with ``data.augment=none`` for ``--cache-epochs`` epochs with and without
``train.feature_cache``: wall time of each epoch (end of one evaluation to the end of the next) and val top-1.
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

DATA_ROOT = Path(os.environ.get("BENCH_DATA_ROOT", REPO.parent / "shared" / "data" / "hymenoptera_data"))
CONFIG = REPO / "configs" / "ants_bees_lite0.yaml"
BACKBONE, WEIGHTS = "timm:tf_efficientnet_lite0", "package:efficientnet-lite0"


# ---------------------------------------------------------------------------------------------
# measurement helpers (run inside the child process)


class _MemorySampler:
    """Peak PSS (bytes) of this process plus its children, sampled in a thread every ``interval`` s
    (``memory_full_info`` reads /proc/<pid>/smaps: ~30 ms of CPU per process, holding the GIL)."""

    def __init__(self, interval: float = 5.0):
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
        idx = [i for i in range(max(1, warmup), len(self.ends)) if not self.first_of_epoch[i]]
        if not idx:
            raise RuntimeError(f"no steady-state step to time ({len(self.ends)} steps, warmup {warmup})")

        def rate(ids):
            return sum(self.samples[i] for i in ids) / sum(self.ends[i] - self.ends[i - 1] for i in ids)

        dt = sum(self.ends[i] - self.ends[i - 1] for i in idx)
        cpu = sum(self.cpu[i] - self.cpu[i - 1] for i in idx)
        n = sum(self.samples[i] for i in idx)
        half = len(idx) // 2
        halves = (rate(idx[:half]), rate(idx[half:])) if half else (n / dt, n / dt)
        return {"steps": len(idx), "samples": n, "seconds": dt, "images_per_s": n / dt,
                "images_per_cpu_s": n / cpu if cpu > 0 else float("nan"),
                "data_wait": sum(self.waits[i] for i in idx) / dt, "halves": halves}


# ---------------------------------------------------------------------------------------------
# the machine


def cpu_info() -> dict:
    """CPU model, cores this process may use and the ISA flags that matter for matmul/conv (Linux)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"model": model, "cores": len(os.sched_getaffinity(0)),
            "flags": {f: f in flags for f in wanted}}


# ---------------------------------------------------------------------------------------------
# the model alone, the trainer and the plain loop (run inside the child process)


def _stable_rate(fn, batch: int, *, block_s: float = 2.0, tol: float = 0.03, max_blocks: int = 8) -> tuple[float, int]:
    """images/s of ``fn`` (one batch per call), warmed up until two consecutive blocks of calls (each at
    least ``block_s`` seconds) agree within ``tol``; returns (mean of the last two blocks, blocks run)."""
    t = time.perf_counter()
    fn()
    per_call = max(time.perf_counter() - t, 1e-3)
    calls = max(2, int(block_s / per_call) + 1)
    rates: list[float] = []
    while len(rates) < max_blocks:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(batch * calls / (time.perf_counter() - t))
        if len(rates) >= 2 and abs(rates[-1] - rates[-2]) <= tol * max(rates[-2:]):
            break
    return (rates[-1] + rates[-2]) / 2 if len(rates) >= 2 else rates[-1], len(rates)


def run_model_alone(mode: str, precision: str, args, *, compile_model: bool = False) -> dict:
    """The model's own limit on synthetic batches (see the module docstring); with ``compile_model``
    also the compile time (first call minus one steady call)."""
    import torch

    from trainer.models.build import build_model

    torch.manual_seed(0)
    model, pre = build_model(BACKBONE, 2, WEIGHTS, channels_last=True)
    size = args.size or pre.input_size
    x = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch,))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    if mode == "fe":
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

        def step():
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    out = {}
    if compile_model:
        model.compile()
        t = time.perf_counter()
        step()
        first = time.perf_counter() - t
    rate, blocks = _stable_rate(step, args.batch)
    out.update(alone_images_per_s=rate, alone_blocks=blocks)
    if compile_model:
        out["compile_s"] = max(0.0, first - args.batch / rate)
    return out


def run_plain(mode: str, args) -> StepTimer:
    """The tutorial loop. ``mode``: 'fe' (feature extraction) or 'ft' (full fine-tuning)."""
    import torch
    from torchvision import datasets, transforms

    from trainer.models.build import build_model

    torch.manual_seed(0)
    model, pre = build_model(BACKBONE, 2, WEIGHTS)
    interp = transforms.InterpolationMode(pre.interpolation)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.size or pre.input_size, interpolation=interp),
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
    """``trainer.train.start.run`` on the shards of the same images, instrumented from outside."""
    import trainer.train.evaluation as eval_mod
    import trainer.train.epoch as run_mod  # where the Trainer's epochs call train_step
    from trainer.train.start import run
    from trainer.config.loading import load_config

    timer = StepTimer()
    orig_step, orig_eval = run_mod.train_step, eval_mod.evaluate

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

    run_mod.train_step, eval_mod.evaluate = train_step, evaluate  # the names the trainer's modules call
    out_dir = tempfile.mkdtemp(prefix="bench_trainer_")
    shard_dir = Path(args.shard_dir)
    epochs = -(-args.steps // -(-args.train_samples // args.batch))  # ceil(steps / steps_per_epoch)
    overrides = {
        "data.root": str(DATA_ROOT), "data.shard_dir": str(shard_dir), "data.num_workers": args.workers,
        "train.micro_batch_size": args.batch, "train.global_batch_size": args.batch,
        "train.eval_batch_size": args.batch, "data.image_size": args.size or None,
        "train.epochs": epochs, "train.max_steps": args.steps, "train.output_dir": out_dir,
        "logging.wandb": "disabled", "logging.progress": False,
        "finetune.freeze": "backbone" if mode == "fe" else "none",
    }
    if not full_val:  # evaluation is not timed: one val shard keeps the run short
        overrides["data.val_shards"] = str(shard_dir / "val-000000.tar")
    overrides.update(extra or {})
    cfg = load_config(CONFIG, overrides)
    result = run(cfg)
    return timer, result


def child(args) -> None:
    """Run one variant ``impl:mode:precision[:compile]`` and print one JSON line with its figures."""
    import torch
    parts = args.child.split(":")
    impl, mode, precision = parts[0], parts[1], parts[2] if len(parts) > 2 else "fp32"
    compiled = "compile" in parts[3:]
    out: dict = {}
    if impl in ("trainer", "alone"):
        out.update(run_model_alone(mode, precision, args, compile_model=compiled))
    if impl != "alone":
        with _MemorySampler() as mem:
            if impl == "plain":
                timer = run_plain(mode, args)
            else:
                import trainer.data.loader as loader_mod
                loader_mod.WORKER_NICE = args.worker_nice
                extra = {"train.mixed_precision": "bf16" if precision == "bf16" else "no",
                         "model.compile": compiled}
                timer, _ = run_trainer(mode, args, extra=extra)
        out.update(timer.summary(args.warmup))
        out.update(pss_tree_mb=mem.peak / 2**20)
    out.update(variant=args.child, rss_main_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               torch_threads=torch.get_num_threads())
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


MODE_NAME = {"fe": "feature extraction", "ft": "fine-tuning"}
TARGET_ALONE, TARGET_PLAIN = 0.85, {"fe": 2.5, "ft": 1.5}


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _throughput(args, common: list[str]) -> None:
    modes = args.modes.split(",")
    precisions = args.precisions.split(",")
    variants = [f"plain:{m}" for m in modes] + [f"trainer:{m}:{p}" for m in modes for p in precisions]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            res = _spawn(["--child", v, *common], args.timeout)
            results[v].append(res)
            alone = f"alone {res['alone_images_per_s']:6.1f}  " if "alone_images_per_s" in res else ""
            print(f"  round {r + 1} {v:18s} {alone}run {res['images_per_s']:6.1f} img/s (halves "
                  f"{res['halves'][0]:.1f} / {res['halves'][1]:.1f})  {res['images_per_cpu_s']:5.1f} img/cpu-s  "
                  f"wait {res['data_wait']:.0%}", flush=True)
    print()
    print("| mode | precision | model alone img/s | trainer img/s | fraction of model alone | plain loop img/s "
          "| trainer / plain | stable (1st / 2nd half img/s) | trainer img/cpu-s | data wait | RSS main MB | PSS tree MB |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    verdicts = []
    for m in modes:
        plain = results[f"plain:{m}"]
        p_ips = _median(plain, "images_per_s")
        for p in precisions:
            rs = results[f"trainer:{m}:{p}"]
            alone, ips = _median(rs, "alone_images_per_s"), _median(rs, "images_per_s")
            h1, h2 = _median([{"h": r["halves"][0]} for r in rs], "h"), _median([{"h": r["halves"][1]} for r in rs], "h")
            frac, rel = ips / alone, ips / p_ips
            print(f"| {MODE_NAME[m]} | {p} | {alone:.1f} | {ips:.1f} | {frac:.2f} | {p_ips:.1f} | {rel:.2f}x | "
                  f"{'yes' if abs(h1 - h2) <= 0.1 * max(h1, h2) else 'NO'} ({h1:.1f} / {h2:.1f}) | "
                  f"{_median(rs, 'images_per_cpu_s'):.1f} | {_median(rs, 'data_wait'):.0%} | "
                  f"{_median(rs, 'rss_main_mb'):.0f} | {_median(rs, 'pss_tree_mb'):.0f} |")
            verdicts.append(f"{MODE_NAME[m]} {p}: {frac:.2f} of model alone (target >= {TARGET_ALONE}) "
                            f"{'ok' if frac >= TARGET_ALONE else 'MISSED'}; {rel:.2f}x plain (target >= "
                            f"{TARGET_PLAIN[m]}x) {'ok' if rel >= TARGET_PLAIN[m] else 'MISSED'}")
        print(f"| {MODE_NAME[m]} | plain loop, fp32 | - | - | - | {p_ips:.1f} | 1.00x | - | "
              f"{_median(plain, 'images_per_cpu_s'):.1f} | {_median(plain, 'data_wait'):.0%} | "
              f"{_median(plain, 'rss_main_mb'):.0f} | {_median(plain, 'pss_tree_mb'):.0f} |")
    print()
    for v in verdicts:
        print(v)
    print(flush=True)


def _compile_table(args, common: list[str]) -> None:
    variants = [v.split(":") for v in args.compile_variants.split(",")]
    print("| mode | precision | eager img/s | compiled img/s | gain | compile s | break-even images |"
          + (" trainer compiled img/s |" if args.compile_trainer else ""))
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if args.compile_trainer else ""))
    for m, p in variants:
        eager = _spawn(["--child", f"alone:{m}:{p}", *common], args.timeout)
        comp = _spawn(["--child", f"{'trainer' if args.compile_trainer else 'alone'}:{m}:{p}:compile", *common],
                      args.timeout)
        e, c = eager["alone_images_per_s"], comp["alone_images_per_s"]
        saved = 1 / e - 1 / c  # seconds saved per image
        even = f"{comp['compile_s'] / saved:.0f}" if saved > 0 else "never"
        print(f"| {MODE_NAME[m]} | {p} | {e:.1f} | {c:.1f} | {c / e:.2f}x | {comp['compile_s']:.0f} | {even} |"
              + (f" {comp['images_per_s']:.1f} |" if args.compile_trainer else ""), flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=45, help="optimizer steps per trainer / plain variant")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded at the start")
    ap.add_argument("--batch", type=int, default=16, help="batch size (one micro-batch per step)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (0: the backbone's own, 224)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (both implementations)")
    ap.add_argument("--worker_nice", type=int, default=None,
                    help="the trainer's loader worker niceness (default: trainer.data.loader.WORKER_NICE)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the median is reported")
    ap.add_argument("--modes", default="fe,ft", help="fe (feature extraction), ft (fine-tuning)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile table (model alone)")
    ap.add_argument("--compile_variants", default="fe:fp32,fe:bf16,ft:fp32", help="mode:precision list for --compile")
    ap.add_argument("--compile_trainer", action="store_true",
                    help="--compile also runs the trainer with model.compile=true (minutes more per variant)")
    ap.add_argument("--cache", action="store_true", help="also the feature-cache table")
    ap.add_argument("--cache-epochs", type=int, default=3, help="epochs of the feature-cache comparison")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    ap.add_argument("--shard_dir", default=str(REPO / "data" / "shards" / "hymenoptera"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant subprocess")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child_cache", help=argparse.SUPPRESS)
    ap.add_argument("--train_samples", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child or args.child_cache:
        import logging
        logging.disable(logging.INFO)
        if args.worker_nice is None:
            from trainer.data.loader import WORKER_NICE
            args.worker_nice = WORKER_NICE
        (child if args.child else child_cache)(args)
        return

    import torch

    from trainer.data.loader import WORKER_NICE, WORKER_TORCH_THREADS
    from trainer.distributed.accelerator import configure_threads

    n_train = _ensure_shards(Path(args.shard_dir))
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--size", str(args.size), "--workers", str(args.workers), "--shard_dir", args.shard_dir,
              "--train_samples", str(n_train), "--cache-epochs", str(args.cache_epochs)]
    if args.worker_nice is not None:
        common += ["--worker_nice", str(args.worker_nice)]
    cpu = cpu_info()
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    print(f"# bench/train.py  CPU: {cpu['model']}, {cpu['cores']} cores; {flags}", flush=True)
    print(f"# torch {torch.__version__}, {configure_threads()} torch threads in the training process; "
          f"{args.workers} loader workers x {WORKER_TORCH_THREADS} thread, nice +"
          f"{WORKER_NICE if args.worker_nice is None else args.worker_nice} (trainer), plain loop workers at "
          f"nice 0; load avg {os.getloadavg()[0]:.1f}", flush=True)
    print(f"# {args.size or 224} px, batch {args.batch}, {args.steps} steps per run (warmup {args.warmup}, "
          f"and each epoch's first step, excluded), rounds {args.rounds}", flush=True)

    if not args.no_throughput:
        _throughput(args, common)
    if args.compile:
        _compile_table(args, common)
    if args.cache:
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
