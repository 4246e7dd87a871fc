"""Crash consistency of a whole run folder: a tiny run with step checkpoints, EMA, step evaluations, reports and a
test split, killed with SIGKILL at 20 seeded random moments and restarted each time, ends exactly as the same run
without kills: no temp file anywhere in the folder, each ``(step, kind)`` record once in ``metrics.jsonl``, and every
record (losses, learning rates, val / val_ema / test metrics) equal to the uninterrupted run's.

Each start is a ``fork`` of a server process that imported torch and the trainer once (:data:`SERVER`), so a
start costs the run's own set-up, not an interpreter start-up; a start is killed at a random moment of its run
(start-up, training step, evaluation, report or checkpoint write, test evaluation, training curves).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.launch_util import REPO, child_env
from PIL import Image

from trainer.checkpoint.run_folder import CURVES

SERVER = textwrap.dedent("""
    import json, os, sys, traceback
    import io, matplotlib.pyplot as plt, torch  # (imported once, before any fork)
    plt.figure().savefig(io.BytesIO(), format="png")  # fonts loaded once too
    plt.close("all")
    from trainer.config.loading import load_config
    from trainer.train.start import run

    for line in sys.stdin:
        overrides = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                log = os.open(overrides.pop("_log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(log, 1)
                os.dup2(log, 2)
                run(load_config(None, overrides))
            except BaseException:
                traceback.print_exc()
                code = 3
            os._exit(code)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
""")

KILLS, SEED = 20, 20240523


def _overrides(tmp: Path, out: Path) -> dict:
    """3 epochs of 4 optimizer steps (16 train images, global batch 4 = 2 x 2), a tiny timm model on 16 px images."""
    return {"data.root": str(tmp / "img"), "data.shard_dir": str(tmp / "shards"), "data.samples_per_shard": 8,
            "data.num_workers": 0, "data.augment": "none", "data.image_size": 16,
            "model.backbone": "timm:test_efficientnet", "model.weights": "none", "finetune.freeze": "none",
            "optim.lr": 0.02, "optim.warmup_steps": 0, "train.epochs": 3, "train.global_batch_size": 4,
            "train.micro_batch_size": 2,
            "train.log_every_steps": 1, "train.eval_every_steps": 3, "train.checkpoint_every_steps": 1,
            "train.keep_checkpoints": 2, "train.ema_decay": 0.5, "train.output_dir": str(out),
            "logging.wandb": "disabled", "logging.progress": False}


VARYING = ("time", "train/images_per_s", "lp/feature_seconds", "lp/fit_seconds")


def _images(root: Path) -> None:
    """12 x 10 px JPEGs of two classes told apart by brightness (the model learns, so ``best/`` is rewritten)."""
    rng = random.Random(0)
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for cls, level in (("dark", 50), ("bright", 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                colour = tuple(min(255, max(0, level + rng.randint(-40, 40))) for _ in range(3))
                Image.new("RGB", (12, 10), colour).save(root / split / cls / f"{i}.jpg", quality=95)


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VARYING} for r in rows]


def _kind(row: dict) -> str:
    return next((p for p in ("train/", "val/", "test/") if any(k.startswith(p) for k in row)), "other")


def _wait_lines(log: Path, offset: int, pid: int, n: int) -> bool:
    """Wait until start ``pid`` (its log begins at byte ``offset`` of ``log``) has logged ``n`` lines; False if it
    ended first."""
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            if f.read().count(b"\n") >= n:
                return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.001)


def _progress(out: Path) -> tuple[int, int]:
    """(newest step checkpoint, end-of-run files written: test metrics, training curves) of run folder ``out``."""
    steps = [int(p.name[5:14]) for p in (out / "checkpoints").glob("step_*.pt")] if out.is_dir() else []
    return max(steps, default=0), sum((out / f).is_file() for f in ("reports/test_metrics.json", CURVES))


class Server:
    """The fork server: ``start(overrides)`` forks one run and returns its pid; ``wait()`` its wait status."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=REPO, env=child_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, overrides: dict) -> int:
        self.proc.stdin.write(json.dumps({**overrides, "_log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_twenty_kills_leave_the_run_folder_as_an_uninterrupted_run(tmp_path):
    _images(tmp_path / "img")
    full, part = tmp_path / "full", tmp_path / "part"
    server = Server(tmp_path / "runs.log")
    try:
        server.start({**_overrides(tmp_path, tmp_path / "warm"), "train.max_steps": 1})  # writes the shards
        assert server.wait() == 0, server.log.read_text()[-4000:]
        offset = server.log.stat().st_size
        server.start(_overrides(tmp_path, full))  # the reference
        assert server.wait() == 0, server.log.read_text()[-4000:]
        logged = server.log.read_bytes()[offset:].splitlines()
        setup = next(i for i, line in enumerate(logged) if b": phase 0 " in line) + 1  # lines before training
        first_record = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])["time"]
        base = (time.time() - first_record) / 40  # a 40th of the reference run after its set-up (0.05 s here)
        rng, landed, at, window = random.Random(SEED), 0, [], base  # at: the folder's progress after each kill
        for _ in range(KILLS):
            offset = server.log.stat().st_size
            pid = server.start(_overrides(tmp_path, part))
            # in the set-up (clean-up, setting aside, rewinding, loading, building), or a few log lines (a step, a
            # checkpoint, an evaluation, a report) into the run; then a random time within a window that grows
            # while the kills keep the folder where it was (a long phase: the first reports, the test evaluation)
            lines = rng.randint(0, setup) if rng.random() < 0.25 else setup + rng.randint(0, 3)
            if _wait_lines(server.log, offset, pid, lines):
                time.sleep(rng.uniform(0.0, window))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = server.wait()
            landed += os.WIFSIGNALED(status)
            at.append(_progress(part))
            window = window * 2 if len(at) > 1 and at[-1] == at[-2] else base
            assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 0, server.log.read_text()[-4000:]
        server.start(_overrides(tmp_path, part))  # the last start runs to the end
        assert server.wait() == 0, server.log.read_text()[-4000:]
    finally:
        server.close()
    print(f"{landed} kills landed; (step, end files) after each: {at}")
    assert landed >= KILLS // 2  # most kills hit a running start
    temp = [str(p.relative_to(part)) for p in part.rglob("*") if ".tmp-" in p.name]
    assert temp == []
    rows = _records(part)
    keys = [(r["step"], _kind(r)) for r in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert rows == _records(full)  # every record equal to the uninterrupted run's, in the same order
    assert {k for k in keys if k[1] in ("val/", "test/")} == {(s, "val/") for s in (3, 4, 6, 8, 9, 12)} | {
        (12, "test/")}
    assert json.loads((part / "reports/test_metrics.json").read_text())["test/top1"] == \
        json.loads((full / "reports/test_metrics.json").read_text())["test/top1"]
    assert (part / "reports/training_curves.png").is_file() and (part / "reports/latest/val_per_class.csv").is_file()
