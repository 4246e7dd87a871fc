"""A run with a wall-clock budget: its plan made once (rank 0) and shared, and its length kept to the budget.

:func:`plan_for_run` is called by the Trainer before anything is written into the run folder: a resumed run
reads its ``plan.json`` (:func:`trainer.train.start.run` has applied it already), a new one has rank 0 make the
plan (:func:`trainer.planner.plan.make_plan` for ``finetune.strategy: auto``; for another strategy with
``train.time_budget``, only the length) and broadcast it, so every rank trains with the same config or raises
the same one-line error. :class:`BudgetKeeper` then times the first fine-tuning steps and, when the measured
rate moves the predicted end by more than :data:`REPLAN_TOLERANCE`, sets a new step count that ends at the
budget (the lr schedule is re-shaped over it: warm-up, then cosine to zero at the last step).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from trainer.config.run import ResolvedRun
from trainer.config.schema import Config, ConfigError
from trainer.planner import rules
from trainer.planner.budget import resolve_budget
from trainer.planner.plan import Plan, apply_plan, format_plan, make_plan, read_plan, save_plan

log = logging.getLogger("trainer")

REPLAN_TOLERANCE = 0.15
"""Relative difference between the measured and the planned seconds per step that triggers a new step count."""
TIMED_STEPS = 20
"""Optimizer steps timed (after :data:`SKIP_STEPS` warm-up steps) before the rate is compared with the plan."""
SKIP_STEPS = 3
CHECK_FRACTIONS = (0.1, 0.25, 0.5, 0.75)
"""Later checks, as fractions of the run's steps (each at least :data:`TIMED_STEPS` after the previous one)."""


def needs_plan(cfg: Config) -> bool:
    """Whether the run is planned: ``finetune.strategy: auto`` or a ``train.time_budget``."""
    return cfg.finetune.strategy == "auto" or cfg.train.time_budget is not None


def _length_only_plan(cfg: Config, budget, world_size: int, device: torch.device) -> Plan:
    """A fixed recipe with a budget: its own config; :class:`BudgetKeeper` caps its step count to the budget,
    counting its evaluations (their length estimated from the measured inference rate until one is timed)."""
    from trainer.models.build import build_model
    from trainer.planner.rates import rates_for
    from trainer.data.survey import survey_data

    survey = survey_data(cfg.data)
    size = cfg.data.image_size or build_model(cfg.model.backbone, 2, "none")[1].input_size
    rate = rates_for(cfg.model.backbone, [size], device=device, precision=cfg.train.mixed_precision,
                     batch=min(32, cfg.train.micro_batch_size), channels_last=cfg.model.channels_last)[size]
    per_image = (1 / rate.infer_img_s + rules.loader_seconds(size, device.type)) / world_size
    return Plan(budget_s=budget.seconds, budget_source=budget.source, started_at=budget.started_at,
                world_size=world_size, survey=survey.to_dict(), overrides={}, stages=[], steps=0,
                seconds_per_step=0.0, eval_s=survey.num_val * per_image * (2 if cfg.train.ema_decay else 1),
                after_training_s=rules.REPORT_S + survey.num_test * per_image)


def plan_for_run(cfg: Config, resolved: ResolvedRun, accelerator, out_dir) -> tuple[Config, Plan | None, bool]:
    """The config this run trains with and its plan.

    Returns:
        ``(config, plan or None, new)``; ``new``: the plan was made now (the caller saves it with
        :func:`save_plan` once the run folder is prepared).

    Raises:
        ConfigError: no budget for ``strategy: auto``, a budget too short, data that cannot be read (the same
            line on every rank).
    """
    if not needs_plan(cfg):
        return cfg, None, False
    existing = read_plan(out_dir)
    if existing is not None:  # a resumed run keeps its plan (start.run applied it to cfg)
        return cfg, existing, False
    payload = [None]
    if accelerator.is_main_process:
        try:
            budget = resolve_budget(cfg, resolved.started_at)
            if cfg.finetune.strategy == "auto":
                plan = make_plan(cfg, budget, world_size=accelerator.num_processes, device=accelerator.device)
            else:
                plan = _length_only_plan(cfg, budget, accelerator.num_processes, accelerator.device)
            payload = [("plan", plan.to_dict())]
        except ConfigError as e:
            payload = [("error", str(e))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(payload, from_process=0)
    kind, value = payload[0]
    if kind == "error":
        raise ConfigError(value)
    plan = Plan.from_dict(value)
    if accelerator.is_main_process and plan.stages:
        print(format_plan(plan), flush=True)
    return (apply_plan(cfg, plan) if plan.overrides else cfg), plan, True


def dry_run_plan(resolved: ResolvedRun) -> Config:
    """``--dry_run`` of a budgeted run: print the plan (made now, or the run folder's ``plan.json``) and return
    the config the run would train with; a run without a budget: its config unchanged.

    Raises:
        ConfigError: as :func:`plan_for_run`.
    """
    cfg = resolved.config
    if not needs_plan(cfg):
        return cfg
    plan = read_plan(cfg.train.output_dir)
    if plan is None:
        from trainer.distributed.accelerator import launched_world_size
        budget = resolve_budget(cfg, resolved.started_at)
        if cfg.finetune.strategy != "auto":
            print(f"train.time_budget {budget.seconds:.0f} s: the run's length is capped to it once its first "
                  "steps are timed", flush=True)
            return cfg
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        plan = make_plan(cfg, budget, world_size=launched_world_size(), device=device)
    if plan.stages:
        print(format_plan(plan), flush=True)
    return apply_plan(cfg, plan) if plan.overrides else cfg


class BudgetKeeper:
    """Keeps a planned run's step count to its budget (module docstring). Every rank calls :meth:`after_step`
    after each optimizer step; the checks fall on the same steps on every rank and agree on one clock.

    The rate is timed over windows of optimizer steps (evaluations excluded): the first :data:`TIMED_STEPS`
    after :data:`SKIP_STEPS`, then up to :data:`CHECK_FRACTIONS` of the run (the first steps can run ahead of
    the steady rate on batches the loader prepared beforehand). Only a run that trains from its first step in
    this process checks: a resumed (preempted, requeued) run keeps its plan.
    """

    def __init__(self, plan: Plan, out_dir, accelerator, *, evals_between, warmup_steps: int = 0):
        """Args: plan: the run's plan (its ``replans`` and ``plan.json`` are updated here). evals_between:
        ``(a, b) -> int``, the evaluations a run ending at step ``b`` makes after step ``a`` (its end's included).
        warmup_steps: the run's lr warm-up (``optim.warmup_steps``), shortened with the run when a new step
        count is shorter than it (:func:`warmup_for`)."""
        self.plan, self.out_dir, self.accelerator = plan, out_dir, accelerator
        self.warmup_steps = warmup_steps
        self.evals_between = evals_between
        self.eval_s = plan.eval_s
        self.active = None  # decided at the first step
        self.window = self.t0 = self.next_check = None
        self.excluded = 0.0

    def record_eval(self, seconds: float) -> None:
        """An evaluation took ``seconds``: it is not training time, and the next estimate uses its length."""
        if self.t0 is not None:
            self.excluded += seconds
        self.eval_s = seconds

    def _open_window(self, step: int, total_steps: int) -> None:
        self.window, self.t0, self.excluded = step, time.time(), 0.0
        later = [math.ceil(f * total_steps) for f in CHECK_FRACTIONS]
        self.next_check = min([c for c in later if c >= step + TIMED_STEPS] or [total_steps + 1])

    def after_step(self, step: int, total_steps: int) -> int | None:
        """Call after optimizer step ``step`` (1-based count) of a run of ``total_steps``.

        Returns:
            a new total step count when the measured rate says so (already saved in ``plan.json``), else None.
        """
        if self.active is None:
            self.active = step == 1 and not self.plan.replans
            self.next_check = 1 + SKIP_STEPS
        if not self.active or step != self.next_check:
            return None
        if self.window is None:  # the end of the warm-up steps: the first window opens
            self._open_window(step, total_steps)
            self.next_check = step + TIMED_STEPS
            return None
        now = torch.tensor([time.time() - self.t0 - self.excluded, time.time()], dtype=torch.float64)
        if self.accelerator.num_processes > 1:  # the slowest rank's rate, and one clock for every rank
            now = self.accelerator.reduce(now.to(self.accelerator.device), reduction="none").cpu()
            now = torch.tensor([now.view(-1, 2)[:, 0].max(), now.view(-1, 2)[:, 1].max()], dtype=torch.float64)
        sps = float(now[0]) / (step - self.window)
        new = self._length(step, total_steps, sps, float(now[1]))
        planned_sps = self.plan.seconds_per_step or sps
        self._open_window(step, new or total_steps)
        if new is None:
            return None
        self.plan.replans.append({"step": step, "seconds_per_step": sps, "planned_seconds_per_step": planned_sps,
                                  "steps": new, "previous_steps": total_steps})
        self.plan.steps, self.plan.seconds_per_step = new, sps
        self.plan.overrides = {**self.plan.overrides, "train.steps": new}
        warmup = self.plan.overrides.get("optim.warmup_steps", self.warmup_steps)
        if warmup_for(warmup, new) != warmup:  # kept in plan.json: a resumed run gets the same schedule
            self.plan.overrides["optim.warmup_steps"] = warmup_for(warmup, new)
        if self.plan.overrides.get("train.eval_every_steps"):  # the same number of evaluations
            every = self.plan.overrides["train.eval_every_steps"]
            self.plan.overrides["train.eval_every_steps"] = max(1, round(every * new / max(1, total_steps)))
        if self.accelerator.is_main_process:
            save_plan(self.plan, self.out_dir)
            log.info("planner: measured %.2f s/step against %.2f planned: %d steps instead of %d, to end inside "
                     "the budget", sps, planned_sps, new, total_steps)
        return new

    def _length(self, step: int, total_steps: int, sps: float, now: float) -> int | None:
        """The step count that ends at the budget at ``sps`` seconds per step, if it differs enough from
        ``total_steps`` (rate off by more than :data:`REPLAN_TOLERANCE`, or the steps left by more than it)."""
        left = self.plan.deadline - now - self.plan.after_training_s - self.plan.budget_s * rules.MARGIN
        fits = total_steps
        for _ in range(3):  # the evaluations left depend on the length
            fits = step + rules.steps_that_fit(left - self.evals_between(step, fits) * self.eval_s, sps)
        new = fits if self.plan.stages else min(total_steps, fits)  # a fixed recipe is only shortened
        planned_sps = self.plan.seconds_per_step or sps
        if abs(sps / planned_sps - 1) <= REPLAN_TOLERANCE and \
                abs(new - total_steps) <= REPLAN_TOLERANCE * max(1, total_steps - step):
            return None
        new = max(step + 1, new)
        return None if new == total_steps else new


def warmup_for(warmup_steps: int, steps: int) -> int:
    """The lr warm-up of a run whose step count became ``steps``: unchanged while it fits, else a quarter of the
    run (the planner's share, :mod:`trainer.planner.plan`), so a run the budget keeper shortens below its
    warm-up keeps a warm-up and a cosine decay to 0 at its last step."""
    return warmup_steps if warmup_steps <= steps else steps // 4


def with_steps(cfg: Config, steps: int, eval_every_steps: int | None = None) -> Config:
    """``cfg`` with ``train.steps`` (and ``train.eval_every_steps``) set, and ``optim.warmup_steps`` shortened
    when longer than the new count (:func:`warmup_for`): the config the checkpoints record after a new step
    count."""
    every = cfg.train.eval_every_steps if eval_every_steps is None else eval_every_steps
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, eval_every_steps=every),
                               optim=dataclasses.replace(cfg.optim,
                                                         warmup_steps=warmup_for(cfg.optim.warmup_steps, steps)))


def evals_between(cfg: Config, steps_per_epoch: int, a: int, b: int) -> int:
    """Evaluations a run ending at step ``b`` makes after step ``a``: ``eval_every_steps`` multiples, epoch ends
    (not in a run measured in ``train.steps`` that has ``eval_every_steps``: the Trainer's rule), and the end."""
    every = cfg.train.eval_every_steps
    points = set(range(every * (a // every + 1), b, every)) if every else set()
    if not (cfg.train.steps and every):
        points |= set(range(steps_per_epoch * (a // steps_per_epoch + 1), b, steps_per_epoch))
    return len(points) + 1


def epochs_for(cfg: Config, steps_per_epoch: int) -> int:
    """Epochs the run goes through: ``train.epochs``, or with ``train.steps`` the passes they need."""
    return math.ceil(cfg.train.steps / steps_per_epoch) if cfg.train.steps else cfg.train.epochs


__all__ = ["BudgetKeeper", "dry_run_plan", "epochs_for", "evals_between", "needs_plan", "plan_for_run", "save_plan",
           "warmup_for", "with_steps"]
