"""Starting a run: decide what to do with ``train.output_dir``, then train, resume or report it finished.

:func:`run` is what ``trainer/main.py`` calls (and tests, benchmarks and library callers): the run folder's
plan (:func:`trainer.checkpoint.run_folder.plan_start`: new run, resume, refusal, or "finished"), then
:class:`trainer.train.trainer.Trainer` built from it and :meth:`~trainer.train.trainer.Trainer.fit`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from trainer.config.run import ResolvedRun, resolve_run
from trainer.config.schema import Config
from trainer.planner.plan import apply_plan, read_plan
from trainer.train.budgeted import needs_plan
from trainer.checkpoint.run_folder import plan_start, set_aside_corrupt
from trainer.train.trainer import RunResult, Trainer


def run(cfg: Config, resolved: ResolvedRun | None = None) -> RunResult:
    """Train (or resume) the run described by ``cfg``: ``Trainer(cfg).fit()``, after deciding what to
    do with ``train.output_dir`` (:func:`trainer.checkpoint.run_folder.plan_start`). A run that already
    reached its end says so and returns its counters without touching any file.

    Args:
        cfg: the loaded config.
        resolved: its launcher and machine settings (:func:`trainer.config.run.resolve_run`), resolved by
            the entry point; None: resolved here (a library caller).

    Raises:
        ConfigError: config fields that do not fit the data, the launch or the run folder (names the field).
        trainer.checkpoint.state.CheckpointError: a checkpoint that does not fit this run (names the file).
    """
    resolved = resolved or resolve_run(cfg)  # once per process: the entry point passes its own
    cfg = resolved.config
    if needs_plan(cfg) and (kept := read_plan(cfg.train.output_dir)) is not None:
        cfg = apply_plan(cfg, kept)  # a resumed, preempted or requeued run keeps its plan
    plan = plan_start(cfg)
    if plan.action != "finished":
        return Trainer(cfg, plan, dataclasses.replace(resolved, config=cfg)).fit()
    st = plan.state
    if int(os.environ.get("RANK", "0")) == 0:
        set_aside_corrupt(plan)
        print(f"run in {cfg.train.output_dir} is finished (epoch {st['epoch']}, step {st['step']}): nothing to do; "
              "a larger train.epochs or train.max_steps continues it", file=sys.stderr, flush=True)
    by_length = (st["step"] >= cfg.train.steps if cfg.train.steps else st["epoch"] >= cfg.train.epochs) or (
        cfg.train.max_steps is not None
                                                     and st["step"] >= cfg.train.max_steps)
    return RunResult(output_dir=Path(cfg.train.output_dir), best_top1=st.get("best_top1", -1.0), last_eval={},
                     step=st["step"], epoch=st["epoch"], preempted=False, early_stopped=not by_length)
