"""A stand-in for trainer/main.py in signal and Slurm tests: a loop of fake optimizer steps.

Run as ``torchrun --nproc_per_node 2 ... slurm_fake_trainer.py --out DIR`` or through
``slurm/finetune.sh`` (``FINETUNE_ENTRY``). Every step sleeps ``step_s`` and all-reduces one
tensor (like a gradient sync), then asks ``PreemptionHandler.should_stop``. On stop, rank 0 writes
``DIR/ckpt.json`` atomically (temp file + rename), all ranks meet at a barrier and exit 0. A new run
resumes from ``ckpt.json``. Files per rank r: ``pid.r`` (pid), ``progress.r`` (last step done),
``events.jsonl`` (one JSON line per start/stop/finish, appended by each rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.distributed.signals import PREEMPTED_EXIT_CODE, PreemptionHandler  # noqa: E402


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _event(out: Path, **fields) -> None:
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--step_s", type=float, default=0.1)
    parser.add_argument("--accelerate", action="store_true", help="use accelerate.Accelerator(cpu=True)")
    args, _unknown = parser.parse_known_args()  # finetune.sh passes --config etc.: ignored
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        rank, world = accelerator.process_index, accelerator.num_processes
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:
            dist.init_process_group("gloo")
    (out / f"pid.{rank}").write_text(str(os.getpid()))

    ckpt = out / "ckpt.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    _event(out, event="start", rank=rank, world=world, step=start,
           restart_count=os.environ.get("SLURM_RESTART_COUNT"), node=os.environ.get("SLURM_NODEID"),
           local_rank=os.environ.get("LOCAL_RANK"))

    handler = PreemptionHandler().install()
    try:
        for step in range(start + 1, args.steps + 1):
            time.sleep(args.step_s)
            grad = torch.ones(4)
            if world > 1:
                dist.all_reduce(grad)
            _write_atomic(out / f"progress.{rank}", str(step))
            if handler.should_stop(accelerator):
                if rank == 0:
                    _write_atomic(ckpt, json.dumps({"step": step}))
                if world > 1:
                    dist.barrier()
                _event(out, event="stop", rank=rank, step=step, received=handler.received_signal,
                       agreed=handler.agreed_signal)
                return PREEMPTED_EXIT_CODE
        if world > 1:
            dist.barrier()
        _event(out, event="finish", rank=rank, step=args.steps)
        return 0
    finally:
        handler.restore()
        if dist.is_initialized():  # without this gloo may abort at exit ("terminate called ...")
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
