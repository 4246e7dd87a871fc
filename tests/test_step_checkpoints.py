"""Evaluation and checkpoints by optimizer steps (issue 17 item 2): ``train.eval_every_steps``,
``train.keep_checkpoints``, ``train.resume_from`` (trainer/checkpoint/files.py, run_folder.py, trainer.py).

Fast: the checkpoint files of a run folder (names, pruning, newest complete one, rewinding, the hard link
and its copy fallback) and the config boundary. Slow: real runs on a few ants/bees images (evaluations at
the right steps, early stopping on them, k + best kept, resuming from an older checkpoint, and a SIGKILL
between two interval checkpoints).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers.launch_util import REPO, child_env, last_train_step, read_metrics, wait_for
from helpers.realdata import HYMENOPTERA, subset_folder, tiny_overrides

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint import files as files
from trainer.checkpoint.inference import read_model_meta
from trainer.checkpoint.run_folder import plan_start


def fake_state(step: int) -> dict:
    return {"format_version": ckpt_lib.FORMAT_VERSION, "kind": "resume", "step": step, "epoch": 0}


def names(out) -> list[str]:
    return sorted(p.name for p in ckpt_lib.checkpoint_dir(out).iterdir())


def test_keep_k_step_files_and_last_is_a_link_to_the_newest(tmp_path):
    for step in range(1, 7):
        files.save_resume(fake_state(step), tmp_path, step, keep=3)
    assert names(tmp_path) == ["last.pt", "step_000000004.pt", "step_000000005.pt", "step_000000006.pt"]
    last = ckpt_lib.checkpoint_dir(tmp_path) / "last.pt"
    assert os.path.samefile(last, files.step_checkpoint(tmp_path, 6))  # a hard link, not a second copy
    assert files.latest_checkpoint(tmp_path) == last and ckpt_lib.load(last)["step"] == 6
    # keep 1 (default, as before): last.pt only; lowering k deletes the step files after last.pt is written
    files.save_resume(fake_state(7), tmp_path, 7, keep=1)
    assert names(tmp_path) == ["last.pt"] and ckpt_lib.load(last)["step"] == 7


def test_latest_is_the_newest_complete_file(tmp_path):
    files.save_resume(fake_state(4), tmp_path, 4, keep=2)
    # killed after step 6 was written, before last.pt was re-pointed: the step file is newer
    ckpt_lib.atomic_save(fake_state(6), files.step_checkpoint(tmp_path, 6))
    assert files.latest_checkpoint(tmp_path) == files.step_checkpoint(tmp_path, 6)
    # k lowered to 1 and killed before the old step files were deleted: last.pt (step 8) is newer
    ckpt_lib.atomic_save(fake_state(8), ckpt_lib.checkpoint_dir(tmp_path) / "last.pt")
    assert files.latest_checkpoint(tmp_path).name == "last.pt"
    assert files.checkpoint_step(ckpt_lib.checkpoint_dir(tmp_path) / "last.pt") == 8
    assert files.latest_checkpoint(tmp_path / "nothing") is None


def test_rewind_deletes_the_newer_step_files_and_repoints_last(tmp_path):
    for step in (2, 4, 6):
        files.save_resume(fake_state(step), tmp_path, step, keep=3)
    gone = files.rewind(tmp_path, files.step_checkpoint(tmp_path, 4))
    assert [p.name for p in gone] == ["step_000000006.pt"]
    assert names(tmp_path) == ["last.pt", "step_000000002.pt", "step_000000004.pt"]
    assert files.latest_checkpoint(tmp_path).name == "last.pt"
    assert ckpt_lib.load(ckpt_lib.checkpoint_dir(tmp_path) / "last.pt")["step"] == 4


def test_atomic_link_copies_where_hard_links_are_refused(tmp_path, monkeypatch):
    from trainer.files.atomic import atomic_link

    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")

    def refuse(*_a, **_k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    atomic_link(src, dst)
    assert dst.read_bytes() == b"new" and not os.path.samefile(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temp file left


def test_config_boundary_and_resume_from_names(tmp_path):
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        load_config(None, {"train.keep_checkpoints": 0})
    with pytest.raises(ConfigError, match="train.eval_every_steps"):
        load_config(None, {"train.eval_every_steps": -1})
    with pytest.raises(ConfigError, match="train.resume_from"):
        load_config(None, {"train.resume_from": ""})
    out = tmp_path / "run"
    cfg = load_config(None, {"train.output_dir": str(out), "train.resume_from": "step_000000004.pt"})
    with pytest.raises(ConfigError, match=r"train.resume_from: .*step_000000004.pt is not a resume checkpoint"):
        plan_start(cfg)  # an empty folder has no checkpoint to go back to
    for step in (2, 4, 6):
        files.save_resume({**fake_state(step), "config": cfg.to_dict()}, out, step, keep=3)
    (out / "config.yaml").write_text("{}\n")
    plan = plan_start(cfg)  # a bare name is looked up in the run's checkpoints/
    assert plan.action == "resume" and plan.last == files.step_checkpoint(out, 4) and plan.rewind
    elsewhere = tmp_path / "other.pt"
    ckpt_lib.atomic_save(fake_state(1), elsewhere)
    cfg.train.resume_from = str(elsewhere)
    with pytest.raises(ConfigError, match="is not a resume checkpoint of train.output_dir"):
        plan_start(cfg)


# ---------------------------------------------------------------------------------------------
# real runs: 8 training images, global batch 2 -> 4 optimizer steps per epoch

needs_data = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    root = tmp_path_factory.mktemp("steps")
    subset_folder(root / "images", {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2}})
    return root


SMALL = {"train.global_batch_size": 2, "train.micro_batch_size": 2, "data.samples_per_shard": 4,
         "optim.warmup_steps": 0, "train.log_every_steps": 1}


def run(tiny, out, **overrides):
    from helpers.inprocess import run_in_process

    return run_in_process(tiny / "images", tiny / "shards", out, **{**SMALL, **overrides})


def val_steps(out) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val/top1" in r]


@pytest.mark.slow
@needs_data
def test_eval_every_steps_evaluates_at_those_steps_and_epoch_ends(tiny):
    out = tiny / "every3"
    res = run(tiny, out, **{"train.epochs": 2, "train.eval_every_steps": 3})
    assert res.step == 8 and not res.early_stopped
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "val/top1" in r]
    assert [r["step"] for r in rows] == [3, 4, 6, 8]  # every 3 steps, plus each epoch end (4, 8) once
    assert [r["samples_seen"] for r in rows] == [6, 8, 12, 16]
    assert [r["epoch"] for r in rows] == [0, 1, 1, 2]  # completed epochs at that step
    assert read_model_meta(out / "checkpoints/best")["metrics"]["step"] in (3, 4, 6, 8)


@pytest.mark.slow
@needs_data
def test_early_stopping_counts_step_evaluations(tiny):
    # min_delta 1e9 on the val loss: only the first evaluation improves; patience 1 -> stop at the second
    out = tiny / "stop"
    res = run(tiny, out, **{"train.epochs": 3, "train.eval_every_steps": 1, "train.early_stopping.monitor": "val/loss",
                            "train.early_stopping.patience": 1, "train.early_stopping.min_delta": 1e9})
    assert res.early_stopped and res.step == 2 and res.epoch == 0  # mid-epoch, no end-of-epoch evaluation
    assert val_steps(out) == [1, 2]
    assert read_model_meta(out / "checkpoints/best")["metrics"]["step"] == 1
    last = ckpt_lib.load(out / "checkpoints/last.pt")
    assert last["step"] == 2 and last["early_stopping"]["stopped"] and last["reason"] == "early stopping"
    again = run(tiny, out, **{"train.epochs": 3, "train.eval_every_steps": 1,
                              "train.early_stopping.monitor": "val/loss", "train.early_stopping.patience": 1,
                              "train.early_stopping.min_delta": 1e9})
    assert again.early_stopped and again.step == 2 and val_steps(out) == [1, 2]  # stopped stays stopped


@pytest.mark.slow
@needs_data
def test_keep_checkpoints_then_resume_from_an_older_one(tiny):
    out = tiny / "keep"
    common = {"train.epochs": 2, "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 2}
    res = run(tiny, out, **common)
    assert res.step == 8
    assert names(out) == ["best", "last.pt", "step_000000007.pt", "step_000000008.pt"]  # k = 2 + best

    again = run(tiny, out, **common, **{"train.resume_from": "step_000000007.pt"})
    assert again.step == 8
    state = ckpt_lib.load(out / "checkpoints/last.pt")
    assert state["step"] == 8 and state["resumed_from"] == "step_000000007.pt"
    train_steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert train_steps == list(range(1, 9))  # history after step 7 rewound, step 8 once
    assert names(out) == ["best", "last.pt", "step_000000007.pt", "step_000000008.pt"]
    # the same command again (a requeued job): the newest checkpoint already continues step 7 -> finished
    before = read_metrics(out / "metrics.jsonl")
    third = run(tiny, out, **common, **{"train.resume_from": "step_000000007.pt"})
    assert third.step == 8 and read_metrics(out / "metrics.jsonl") == before


@pytest.mark.slow
@needs_data
def test_sigkill_between_interval_checkpoints_resumes_from_the_last_complete_one(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/ants_bees_lite0.yaml",
            *tiny_overrides(tiny / "images", tiny / "shards", out,
                            **{**SMALL, "train.epochs": 20, "train.checkpoint_every_steps": 2,
                               "train.keep_checkpoints": 2})]
    with open(tmp_path / "first.log", "w") as log_file:  # a file, not a pipe: a full pipe would block it
        proc = subprocess.Popen([sys.executable, "trainer/main.py", *args], cwd=REPO, env=child_env(),
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # step 5 trained: the checkpoint of step 4 is complete, the one of step 6 at most under way
            wait_for(lambda: files.step_checkpoints(out) and last_train_step(out) >= 5, 600, "training step 5", proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    newest = files.latest_checkpoint(out)
    step = ckpt_lib.load(newest)["step"]
    assert step >= 4 and step % 2 == 0
    resumed = subprocess.run([sys.executable, "trainer/main.py", *args, f"--train.max_steps={step + 2}"],
                             cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"step {step} (samples_seen {2 * step})" in resumed.stderr
    leftovers = [p for d in (out, out / "checkpoints", out / "checkpoints/best") for p in d.iterdir()
                 if ".tmp-" in p.name]
    assert leftovers == []
    assert names(out) == ["best", "last.pt", f"step_{step:09d}.pt", f"step_{step + 2:09d}.pt"]
    train_steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert train_steps == list(range(1, step + 3))  # each step once: none lost, none twice


# ---------------------------------------------------------------------------------------------
# damaged checkpoints (issue 23 item 4): never block a start, never deleted


def _truncate(path) -> None:
    data = path.read_bytes()
    with open(path, "r+b") as f:  # in place: a hard-linked last.pt is cut with it
        f.truncate(len(data) // 2)


def _kept_run(out, cfg, steps=(2, 4, 6)):
    for step in steps:
        files.save_resume({**fake_state(step), "config": cfg.to_dict()}, out, step, keep=3)
    (out / "config.yaml").write_text("{}\n")


def test_corrupt_newest_checkpoint_is_set_aside_and_the_newest_intact_one_resumed(tmp_path, caplog):
    from trainer.checkpoint.run_folder import prepare_folder

    out = tmp_path / "run"
    cfg = load_config(None, {"train.output_dir": str(out)})
    _kept_run(out, cfg)
    _truncate(files.step_checkpoint(out, 6))  # last.pt is the same file
    plan = plan_start(cfg)
    assert plan.action == "resume" and plan.last == files.step_checkpoint(out, 4) and not plan.rewind
    assert sorted(p.name for p, _ in plan.corrupt) == ["last.pt", "step_000000006.pt"]
    assert names(out) == ["last.pt", "step_000000002.pt", "step_000000004.pt", "step_000000006.pt"]  # plan only reads
    with caplog.at_level("WARNING", logger="trainer"):
        prepare_folder(plan, out)
    assert names(out) == ["corrupt", "step_000000002.pt", "step_000000004.pt"]
    assert sorted(p.name for p in (ckpt_lib.checkpoint_dir(out) / "corrupt").iterdir()) == \
        ["last.pt", "step_000000006.pt"]  # moved, never deleted
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step_000000006.pt is unreadable" in w and "corrupt/step_000000006.pt" in w
               and "continues from step_000000004.pt" in w for w in warned), warned
    assert plan_start(cfg).last == files.step_checkpoint(out, 4)  # the next start: nothing left to set aside


def test_resume_from_is_honoured_whatever_the_newest_checkpoint_holds(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, {"train.output_dir": str(out), "train.resume_from": "step_000000002.pt"})
    _kept_run(out, cfg)
    _truncate(files.step_checkpoint(out, 6))
    plan = plan_start(cfg)
    assert plan.action == "resume" and plan.last == files.step_checkpoint(out, 2) and plan.rewind
    assert [p.name for p, _ in plan.corrupt] == ["last.pt", "step_000000006.pt"]


def test_no_intact_checkpoint_is_refused_saying_what_to_do(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, {"train.output_dir": str(out)})
    _kept_run(out, cfg, steps=(2,))
    _truncate(files.step_checkpoint(out, 2))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no resume checkpoint loads .*: move last.pt, "
                                                       r"step_000000002.pt out of .* to start the run over"):
        plan_start(cfg)
    assert names(out) == ["last.pt", "step_000000002.pt"]  # a refused start moves nothing
    cfg.train.resume_from = "step_000000002.pt"
    with pytest.raises(ckpt_lib.CheckpointError, match="train.resume_from: cannot read checkpoint .*choose another"):
        plan_start(cfg)


# ---------------------------------------------------------------------------------------------
# a kill at an epoch end (issue 23 item 8): each evaluation recorded once, each checkpoint written once


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of the run handles it."""


def _kill_at(monkeypatch, step: int, reason: str, writes: list):
    """Record every resume-checkpoint write as (step, reason); raise :class:`Killed` instead of the first write of
    (``step``, ``reason``)."""
    from trainer.checkpoint import checkpointer as checkpointer

    real = files.save_resume

    def save_resume(state, output_dir, at, keep):
        writes.append((at, state["reason"]))
        if (at, state["reason"]) == (step, reason) and writes.count((at, reason)) == 1:
            raise Killed
        return real(state, output_dir, at, keep)

    monkeypatch.setattr(checkpointer, "save_resume", save_resume)


@pytest.mark.slow
@needs_data
def test_kill_before_the_epoch_checkpoint_leaves_one_evaluation_record(tiny, monkeypatch):
    out = tiny / "epoch_kill"
    common = {"train.epochs": 2, "train.checkpoint_every_steps": 2, "train.keep_checkpoints": 2}
    writes = []
    _kill_at(monkeypatch, 4, "epoch", writes)
    with pytest.raises(Killed):  # evaluated at step 4 (its record written), killed writing step_000000004.pt
        run(tiny, out, **common)
    assert run(tiny, out, **common).step == 8
    assert val_steps(out) == [4, 8]  # step 4's evaluation once: resumed from step 2, its later records rewound
    # an epoch's end is one write (not an interval checkpoint and then the epoch's); step 4's twice: killed once
    assert writes == [(2, "interval"), (4, "epoch"), (4, "epoch"), (6, "interval"), (8, "epoch")]


@pytest.mark.slow
@needs_data
def test_checkpoint_written_before_an_epoch_end_evaluation_has_it_redone_once(tiny, monkeypatch):
    """A preemption at an epoch's last step writes the checkpoint before that epoch's evaluation; the next start
    evaluates and is killed before its own checkpoint: the start after it evaluates again, one record remains."""
    from trainer.distributed.signals import PreemptionHandler

    out = tiny / "preempted_kill"
    common = {"train.epochs": 2}
    calls = []
    monkeypatch.setattr(PreemptionHandler, "should_stop", lambda self, acc=None: calls.append(1) or len(calls) == 4)
    res = run(tiny, out, **common)
    assert res.preempted and res.step == 4 and val_steps(out) == []
    assert ckpt_lib.load(out / "checkpoints/last.pt")["reason"].startswith("preempted")  # written before evaluating
    monkeypatch.undo()
    _kill_at(monkeypatch, 4, "epoch", [])
    with pytest.raises(Killed):
        run(tiny, out, **common)
    assert val_steps(out) == [4]
    assert run(tiny, out, **common).step == 8
    assert val_steps(out) == [4, 8]
