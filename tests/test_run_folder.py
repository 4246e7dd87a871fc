"""Run folders with one meaning (trainer/checkpoint/run_folder.py) and start-up clean-up after kills.

The start plan is decided from the folder alone (fast tests on synthetic folders); the re-run
scenario of a finished run and the random-kill test run real processes (slow).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.config.loading import save_config
from trainer.config.schema import Config, ConfigError
from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint import inference as infer_ckpt
from trainer.checkpoint import run_folder as rf

REPO = Path(__file__).resolve().parents[1]


def _cfg(out: Path, **changes) -> Config:
    cfg = Config()
    cfg.train.output_dir = str(out)
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _finished_run(out: Path, *, step=6, epoch=3, **changes) -> Config:
    """A folder as a finished run leaves it: config.yaml, metrics.jsonl, last.pt (counters + config), and the
    training curves drawn after it (the end-of-run work is complete)."""
    cfg = _cfg(out, **changes)
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    (out / "metrics.jsonl").write_text('{"step": 6}\n')
    ckpt_lib.atomic_save({"format_version": ckpt_lib.FORMAT_VERSION, "kind": "resume", "step": step,
                          "epoch": epoch, "config": cfg.to_dict(), "early_stopping": {}},
                         ckpt_lib.checkpoint_dir(out) / "last.pt")
    (out / rf.CURVES).parent.mkdir()
    (out / rf.CURVES).write_bytes(b"png")
    return cfg


def test_new_and_empty_folders_start_new_runs(tmp_path):
    assert rf.plan_start(_cfg(tmp_path / "missing")).action == "new"
    (tmp_path / "empty").mkdir()
    assert rf.plan_start(_cfg(tmp_path / "empty")).action == "new"


def test_changed_config_is_refused_naming_each_key(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    with pytest.raises(ConfigError) as e:
        rf.plan_start(_cfg(out, **{"optim.lr": 1e-2, "train.seed": 5, "train.epochs": 9}))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg
    assert "optim.lr: 0.001 -> 0.01" in msg and "train.seed: 0 -> 5" in msg
    assert "train.epochs" not in msg  # allowed: listed only among the refused keys when it is not


def test_allowed_changes_resume_and_a_finished_run_is_finished(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    plan = rf.plan_start(_cfg(out))
    assert plan.action == "finished" and plan.state["step"] == 6
    plan = rf.plan_start(_cfg(out, **{"train.epochs": 5, "data.num_workers": 0, "logging.wandb": "disabled"}))
    assert plan.action == "resume" and plan.last == ckpt_lib.checkpoint_dir(out) / "last.pt"
    assert plan.changes == ["data.num_workers: 2 -> 0", "logging.wandb: 'auto' -> 'disabled'",
                            "train.epochs: 3 -> 5"]
    assert rf.plan_start(_cfg(out, **{"train.max_steps": 6})).action == "finished"
    assert rf.plan_start(_cfg(out, **{"train.max_steps": 7, "train.epochs": 4})).action == "resume"


def test_resume_false_needs_overwrite_and_foreign_folders_are_never_cleared(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    with pytest.raises(ConfigError, match="train.overwrite"):
        rf.plan_start(_cfg(out, **{"train.resume": False}))
    plan = rf.plan_start(_cfg(out, **{"train.resume": False, "train.overwrite": True, "optim.lr": 0.5}))
    assert plan.action == "new" and plan.clear
    rf.clear_folder(out)
    assert out.is_dir() and not any(out.iterdir())

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for changes in ({}, {"train.resume": False, "train.overwrite": True}):
        with pytest.raises(ConfigError, match="not a run's"):
            rf.plan_start(_cfg(foreign, **changes))
    with pytest.raises(ConfigError, match="not a run folder"):
        rf.clear_folder(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_start_without_checkpoint_restarts_only_with_the_same_config(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    save_config(_cfg(out), out / "config.yaml")  # a start that died before its first checkpoint
    assert rf.plan_start(_cfg(out)).action == "restart"
    with pytest.raises(ConfigError, match=r"config.yaml\): optim.lr: 0.001 -> 0.2"):
        rf.plan_start(_cfg(out, **{"optim.lr": 0.2}))


def _snapshot(out: Path) -> dict:
    files = ["config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best/model.json",
             "checkpoints/best/model.safetensors"]
    return {f: (out / f).read_bytes() for f in files}


@pytest.mark.slow
def test_rerun_of_a_finished_run_with_another_lr_is_refused_and_changes_nothing(tmp_path):
    from helpers.launch_util import child_env
    from helpers.realdata import HYMENOPTERA, subset_folder, tiny_overrides

    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    subset_folder(tmp_path / "img", {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2}})
    out = tmp_path / "run"

    def start(*extra):
        args = ["--config", "configs/ants_bees_lite0.yaml",
                *tiny_overrides(tmp_path / "img", tmp_path / "shards", out,
                                **{"train.epochs": 1, "train.global_batch_size": 4, "train.micro_batch_size": 4,
                                   "optim.warmup_steps": 0}),
                *extra]
        return subprocess.run([sys.executable, "trainer/main.py", *args], cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=600)

    first = start()
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)

    changed = start("--optim.lr=1e-2")
    assert changed.returncode == 2, changed.stderr[-3000:]
    lines = [ln for ln in changed.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "optim.lr: " in lines[0] and " -> 0.01" in lines[0], lines
    assert "Traceback" not in changed.stderr
    assert _snapshot(out) == before

    again = start()  # unchanged: finished, nothing to do, exit 0
    assert again.returncode == 0 and "is finished" in again.stderr, again.stderr[-3000:]
    assert _snapshot(out) == before

    fresh = start("--train.resume=false")
    assert fresh.returncode == 2 and "train.overwrite" in fresh.stderr
    assert _snapshot(out) == before


def _temp_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name)


@pytest.mark.slow
def test_random_kills_during_checkpoint_writes_leave_nothing_stale(tmp_path):
    """10 SIGKILLs at seeded random moments in a write of last.pt or best/ (a random delay after a temp
    file appears): every next start
    (rf.clean_start, as the Trainer calls it) leaves no temp file, and last.pt and best/ load, at the
    last completed step or the one being written (its rename may have happened just before the kill)."""
    out = tmp_path / "run"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    last_step, best_step, kills_with_temp = 0, 0, 0
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "tests/helpers/ckpt_writer.py", str(out), str(last_step)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        deadline = time.monotonic() + 30
        while not _temp_files(out) and time.monotonic() < deadline:  # a write is under way ...
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.005))  # ... kill it somewhere inside (or just after)
        os.kill(p.pid, signal.SIGKILL)
        saved = [int(ln.split()[1]) for ln in p.stdout.read().splitlines() if ln.startswith("saved")]
        p.wait()
        kills_with_temp += bool(_temp_files(out))
        rf.clean_start(out)  # what the next start does first
        assert _temp_files(out) == []
        if not (ckpt_lib.checkpoint_dir(out) / "last.pt").exists():
            continue  # killed before its first write completed
        # each file holds the last complete write: the step last reported, or the one written when killed
        done_last = saved[-1] if saved else last_step
        done_best = saved[-1] if saved else best_step
        last_step = ckpt_lib.load(ckpt_lib.checkpoint_dir(out) / "last.pt")["step"]
        assert last_step in (done_last, done_last + 1)
        if (infer_ckpt.best_dir(out) / "model.json").exists():
            meta, _ = infer_ckpt.load_state(infer_ckpt.best_dir(out))  # weights and JSON of one write
            assert meta["metrics"]["step"] in (done_best, last_step) and meta["metrics"]["step"] <= last_step
            best_step = meta["metrics"]["step"]
    assert kills_with_temp >= 5  # the kills really landed mid-write


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_start_up_removes_dead_writers_temp_files_anywhere_in_the_run_folder(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    dead, alive = _dead_pid(), os.getpid()
    stale = [f"reports/latest/.val_per_class.csv.tmp-{dead}", f".metrics.jsonl.tmp-{dead}",
             f".config.yaml.tmp-{dead}", f"reports/.confusion_matrix.png.tmp-{dead}",
             f"checkpoints/best/.model.json.tmp-{dead}", f"checkpoints/.last.pt.tmp-{dead}"]
    kept = [f"reports/latest/.val_per_class.csv.tmp-{alive}",  # a live writer's
            f"reports/notes.tmp-{dead}", f"reports/.notes.tmp-{dead}x", "wandb/run/.x.tmp"]  # not our pattern
    for rel in stale + kept:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("partial")
    removed = rf.clean_start(out)
    assert sorted(str(p.relative_to(out)) for p in removed) == sorted(stale)
    assert all((out / rel).is_file() for rel in kept)


def test_refused_start_writes_nothing_into_the_run_folder(tmp_path, capfd):
    from trainer.main import main

    out = tmp_path / "run"
    _finished_run(out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(**{"train.output_dir": str(out), "optim.lr": 0.5, "logging.wandb": "disabled"})
    assert e.value.code == 2
    assert "optim.lr: 0.001 -> 0.5" in capfd.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # no logs/error-rank0.log


def test_finished_run_killed_in_its_end_of_run_work_resumes_to_complete_it(tmp_path):
    out = tmp_path / "run"
    cfg = _finished_run(out)
    assert rf.plan_start(cfg).action == "finished"
    (out / rf.CURVES).unlink()  # killed before the training curves (the last of the end-of-run work)
    plan = rf.plan_start(cfg)
    assert plan.action == "resume" and plan.last == ckpt_lib.checkpoint_dir(out) / "last.pt"


def test_resume_rewinds_the_records_its_checkpoint_does_not_include(tmp_path):
    from trainer.reporting.tracking import rewind_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 3, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9}, {"step": 4, "epoch": 1, "val/top1": 0.5},
            {"step": 4, "test/top1": 0.4}, {"step": 5, "train/loss": 0.8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the checkpoint of step 4 was written before its evaluation: that record goes, the run evaluates again
    assert rewind_metrics(path, 4, ("val/",)) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [rows[0], rows[1], rows[3]]
    assert [json.loads(line) for line in (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()] == \
        [rows[2], rows[4]]
