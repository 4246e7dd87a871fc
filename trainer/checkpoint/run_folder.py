"""Run folders with one meaning: one ``train.output_dir`` holds one run, and its ``config.yaml`` is the
config that run trained with.

:func:`plan_start` decides, before anything in the folder is written and on every rank alike (it
only reads), what a start does with ``train.output_dir``:

============================================  ===============================  ==========================
folder holds                                   ``train.resume: true``           ``train.resume: false``
============================================  ===============================  ==========================
nothing (missing or empty)                     new run                          new run
``checkpoints/last.pt``                        resume, or refuse (1)            refuse (2)
``config.yaml`` but no ``last.pt`` (a start    start over, or refuse (1)        refuse (2)
that died before its first checkpoint)
other files                                    refuse (3)                       refuse (3)
============================================  ===============================  ==========================

(1) The config saved with the run (``last.pt``'s, else ``config.yaml``) is compared with this one,
key by key. Keys in :data:`RESUMABLE` may differ (more epochs, a new ``max_steps``, logging, loader
workers, evaluation and checkpoint intervals, kept checkpoints, ``resume_from``, ...); any other difference
is refused with one line listing the keys as ``old -> new``. A run that already reached its end (epochs, ``max_steps`` or early stopping of
this config) says so and does nothing (exit 0).
(2) Refused unless ``train.overwrite: true``, which deletes the folder's content first.
``train.resume_from`` (a checkpoint kept in the folder's ``checkpoints/``, e.g. ``step_000000400.pt``)
resumes from that checkpoint instead of the newest one: the step files newer than it are deleted, ``last.pt``
points to it and ``metrics.jsonl`` is rewound to its step. The checkpoints written afterwards record its
name, so a later start with the same ``resume_from`` (a requeued job) continues from the newest one.
(3) A folder without ``config.yaml``, ``checkpoints/`` or ``logs/`` is not a run folder: nothing there is
deleted, not even with ``train.overwrite``; choose another ``train.output_dir``.

An unreadable (truncated, damaged) checkpoint never blocks a start: the newest one that loads is used
(:func:`trainer.checkpoint.files.newest_intact`), and the start moves the damaged ones to
``checkpoints/corrupt/`` with a warning naming each; ``train.resume_from`` is honoured whatever the newest
holds. Only when no checkpoint loads is the start refused, saying what to do. A run that reached its end but
was killed during its end-of-run work (test evaluation, training curves: ``reports/training_curves.png`` older
than the checkpoint) resumes to finish that work.

Keys present in only one of the two configs (a field added or removed by another trainer version)
are not compared.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config.run import resolve_run
from trainer.config.schema import Config, ConfigError
from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint.files import newest_intact, rewind, set_aside
from trainer.files.atomic import remove_stale_temp_files

log = logging.getLogger("trainer")

RESUMABLE = (
    "name", "logging.",
    "train.epochs", "train.max_steps", "train.resume", "train.overwrite", "train.output_dir",
    "train.checkpoint_every_steps", "train.checkpoint_every_minutes", "train.log_every_steps",
    "train.preempt_check_every_steps", "train.dist_timeout_s", "train.eval_batch_size",
    "train.micro_batch_size", "train.early_stopping.patience", "train.early_stopping.min_delta",
    "data.num_workers", "data.pin_memory", "model.compile",
    "train.eval_every_steps", "train.keep_checkpoints", "train.resume_from", "train.steps", "train.time_budget",
)
"""Config keys (exact, or a prefix ending in ``.``) that may change between the starts of one run:
they change how long it runs, what it logs, or how fast it goes, not what it computes per step
(``train.micro_batch_size`` changes only how ``train.global_batch_size`` is split; a new
``train.epochs`` stretches the rest of the lr schedule from the current step). Helpers adding a
setting of this kind (e.g. an evaluation or checkpoint interval) add it here."""


@dataclass
class StartPlan:
    """What a start does with its run folder (see the module docstring).

    Attributes:
        action: ``new`` (empty folder), ``resume`` (from ``last``), ``restart`` (same config, no
            checkpoint yet: train from step 0, earlier metrics rewound), ``finished`` (nothing to do).
        last: the resume checkpoint to resume from (the newest, or ``train.resume_from``). clear: delete the folder's content first
            (``train.overwrite``). changes: allowed differences ``key: old -> new`` (logged).
        state: the loaded ``last.pt`` (``finished`` only: its counters for the result).
        rewind: ``last`` is a ``train.resume_from`` checkpoint not yet gone back to: the newer step files go
            (:func:`trainer.checkpoint.files.rewind`). resumed_from: the ``train.resume_from`` name the
            run continues (recorded in its next checkpoints), or None.
        corrupt: unreadable checkpoints passed over, as ``(path, reason)``: :func:`prepare_folder` sets them aside.
    """

    action: str
    last: Path | None = None
    clear: bool = False
    changes: list[str] = field(default_factory=list)
    state: dict | None = None
    rewind: bool = False
    resumed_from: str | None = None
    corrupt: list[tuple[Path, str]] = field(default_factory=list)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def resumable(key: str) -> bool:
    """True if ``key`` (``section.field``) may differ between starts of one run (:data:`RESUMABLE`)."""
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """Differences between two ``Config.to_dict()`` as ``"key: old -> new"``, split into
    (refused, allowed by :data:`RESUMABLE`). Keys present on one side only are skipped."""
    a, b = _flatten(old), _flatten(new)
    refused, allowed = [], []
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            (allowed if resumable(key) else refused).append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return refused, allowed


def is_finished(state: dict, cfg: Config) -> bool:
    """True if a run at ``last.pt`` state ``state`` has nothing left to do under ``cfg``."""
    t = cfg.train
    step = state.get("step", 0)
    if (t.steps is not None and step >= t.steps) or (t.steps is None and state.get("epoch", 0) >= t.epochs) \
            or (t.max_steps is not None and step >= t.max_steps):
        return True
    es = state.get("early_stopping") or {}
    return (t.early_stopping.patience is not None and es.get("monitor") == t.early_stopping.monitor
            and es.get("mode") == t.early_stopping.mode and int(es.get("wait", 0)) >= t.early_stopping.patience)


ERROR_LOGS = "logs"
"""Folder of error tracebacks (``trainer/cli/errors.py``; a refused start writes none, earlier trainer versions
did): on its own it does not make a folder a run."""


def _is_run_folder(out: Path) -> bool:
    return (out / "config.yaml").is_file() or (out / "checkpoints").is_dir() or (out / ERROR_LOGS).is_dir()


def resume_from_path(cfg: Config) -> Path:
    """The checkpoint ``train.resume_from`` names: a bare file name is looked up in the run's ``checkpoints/``.

    Raises:
        ConfigError: not a file in ``<train.output_dir>/checkpoints/`` (names the kept checkpoints).
    """
    folder = ckpt_lib.checkpoint_dir(cfg.train.output_dir)
    given = Path(cfg.train.resume_from)
    path = folder / given if given.parent == Path(".") else given
    kept = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
    if not path.is_file() or path.resolve().parent != folder.resolve():
        raise ConfigError(f"train.resume_from: {path} is not a resume checkpoint of train.output_dir "
                          f"{cfg.train.output_dir} (kept there: {', '.join(kept) or 'none'})")
    return path


def plan_start(cfg: Config) -> StartPlan:
    """Decide what this start does with ``train.output_dir`` (module docstring); reads, never writes.

    Args:
        cfg: the run's config as resolved at start (:func:`trainer.config.run.resolve_run`: a saved
            ``config.yaml`` records resolved values); an unresolved one (a library caller) is resolved here.

    Raises:
        ConfigError: the folder holds a run of another config (the differing keys, ``old -> new``),
            a run while ``train.resume`` is false and ``train.overwrite`` is not set, or files that
            are not a run's. One line naming ``train.output_dir``.
        trainer.checkpoint.state.CheckpointError: no resume checkpoint loads (what to do), an unreadable
            ``train.resume_from``, or a checkpoint refused for its content.
    """
    if cfg.train.mixed_precision == "auto":
        cfg = resolve_run(cfg).config
    out = Path(cfg.train.output_dir)
    if not out.is_dir() or not any(p.name != ERROR_LOGS for p in out.iterdir()):
        if cfg.train.resume_from:
            resume_from_path(cfg)  # raises: an empty folder has no checkpoint to go back to
        return StartPlan("new")
    if not _is_run_folder(out):
        entries = sorted(p.name for p in out.iterdir())
        raise ConfigError(f"train.output_dir {out} holds files that are not a run's ({', '.join(entries[:5])}"
                          f"{', ...' if len(entries) > 5 else ''}): choose an empty or new folder")
    if not cfg.train.resume:
        if cfg.train.overwrite:
            return StartPlan("new", clear=True)
        raise ConfigError(f"train.output_dir {out} already holds a run and train.resume is false: set "
                          "train.overwrite: true to delete it, or choose another train.output_dir")
    chosen = chosen_state = None
    if cfg.train.resume_from:  # the checkpoint asked for first: the newest may be unreadable
        chosen = resume_from_path(cfg)
        try:
            chosen_state = ckpt_lib.load(chosen)
        except ckpt_lib.CorruptCheckpointError as e:
            raise ckpt_lib.CheckpointError(f"train.resume_from: {e}; choose another checkpoint of "
                                           f"{chosen.parent} for train.resume_from") from None
    last, state, corrupt = newest_intact(out)
    resumed_from, rewind = (state or {}).get("resumed_from"), False
    if chosen is not None and resumed_from != chosen.name:  # not gone back to it yet (module docstring)
        last, state, resumed_from, rewind = chosen, chosen_state, chosen.name, True
    if state is None and corrupt:
        names = ", ".join(p.name for p, _ in corrupt)
        raise ckpt_lib.CheckpointError(
            f"train.output_dir {out}: no resume checkpoint loads ({corrupt[0][1]}): move {names} out of "
            f"{corrupt[0][0].parent} to start the run over from step 0 (or restore a copy), or set train.resume: "
            "false with train.overwrite: true to replace the run")
    if state is not None and isinstance(state.get("config"), dict):
        saved, source = state["config"], last
    elif (out / "config.yaml").is_file():
        try:
            saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {out / 'config.yaml'}: {' '.join(str(e).split())}") from None
        source = out / "config.yaml"
    else:
        saved, source = {}, last
    new = cfg.to_dict()
    if isinstance(saved.get("train"), dict) and saved["train"].get("mixed_precision") == "auto":
        # a config saved unresolved (written by hand or by a tool): 'auto' is whatever this start resolved
        saved = {**saved, "train": {**saved["train"], "mixed_precision": new["train"]["mixed_precision"]}}
    refused, allowed = config_changes(saved, new)
    if refused:
        raise ConfigError(
            f"train.output_dir {out} holds a run of another config ({source.name}): {'; '.join(refused)}. "
            "A run folder holds one run: choose another train.output_dir (or train.resume: false with "
            "train.overwrite: true to replace it); keys resuming may change are listed in "
            "trainer/checkpoint/run_folder.py RESUMABLE")
    if state is None:
        return StartPlan("restart", changes=allowed)
    if is_finished(state, cfg) and not end_of_run_pending(out, last):
        return StartPlan("finished", last=last, changes=allowed, state=state, corrupt=corrupt)
    return StartPlan("resume", last=last, changes=allowed, rewind=rewind, resumed_from=resumed_from,
                     corrupt=corrupt)


CURVES = Path("reports") / "training_curves.png"
"""Drawn last of all by a run's end (``Reporter.finish``): the mark that its end-of-run work is complete."""


def end_of_run_pending(out: Path, last: Path) -> bool:
    """True if the run in ``out`` wrote checkpoint ``last`` but not the end-of-run work after it (the test
    evaluation, then :data:`CURVES`): a kill interrupted it, and a start of the finished run completes it."""
    curves = out / CURVES
    return not curves.is_file() or curves.stat().st_mtime_ns < Path(last).stat().st_mtime_ns


def prepare_folder(plan: StartPlan, out: Path) -> None:
    """Main process, before anything reads the folder: delete its content (``plan.clear``), clean up after
    killed writers (:func:`clean_start`), set unreadable checkpoints aside (:func:`set_aside_corrupt`), go back to
    a ``train.resume_from`` checkpoint (``plan.rewind``:
    :func:`trainer.checkpoint.files.rewind`), log the allowed config changes."""
    if plan.clear:
        clear_folder(out)
    set_aside_corrupt(plan)
    clean_start(out)
    if plan.rewind:
        rewind(out, plan.last)
    for change in plan.changes:
        log.info("%s with a changed setting %s", plan.action, change)


def set_aside_corrupt(plan: StartPlan) -> list[Path]:
    """Main process: move the unreadable checkpoints the plan passed over to ``checkpoints/corrupt/`` (never
    deleted), with a warning naming each and the checkpoint the run continues from. Returns their new paths."""
    moved = []
    for path, why in plan.corrupt:
        if path.exists():
            moved += set_aside([path])
            log.warning("checkpoint %s is unreadable (%s): moved to %s; the run continues from %s", path.name, why,
                        moved[-1], plan.last.name if plan.last is not None else "step 0")
    plan.corrupt = []
    return moved


def clear_folder(out: Path) -> None:
    """Delete the content of run folder ``out`` (``train.overwrite``), keeping the folder itself.

    Raises:
        ConfigError: ``out`` is not a run folder (nothing is deleted).
    """
    if not out.is_dir():
        return
    if not _is_run_folder(out):
        raise ConfigError(f"train.overwrite: {out} is not a run folder; nothing deleted")
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.info("train.overwrite: deleted the previous run in %s", out)


def clean_start(out: Path) -> list[Path]:
    """Start-up clean-up of a run folder (main process, before anything reads the checkpoints):
    complete an inference-checkpoint write that a kill interrupted, then delete the temp files of dead
    writers (:func:`trainer.files.atomic.remove_stale_temp_files`: only its ``.<name>.tmp-<pid>`` names, only of
    pids no longer alive) anywhere under the folder: checkpoints, ``best/``, reports, ``metrics.jsonl``,
    ``config.yaml``, ...

    Returns:
        The temp files removed.
    """
    from trainer.checkpoint import inference as infer_ckpt

    best = infer_ckpt.best_dir(out)
    if infer_ckpt.repair(best):
        log.warning("completed the interrupted write of %s/%s", best, infer_ckpt.META_FILE)
    removed = remove_stale_temp_files(out, recursive=True)
    if removed:
        log.info("removed %d temp file(s) of killed writers: %s", len(removed),
                 ", ".join(str(p.relative_to(out)) for p in removed))
    return removed
