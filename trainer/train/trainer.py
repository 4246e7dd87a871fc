"""One training run: a thin composition of the parts built before it (:mod:`trainer.train.components`).

:func:`trainer.train.start.run` decides what to do with ``train.output_dir`` (:mod:`trainer.checkpoint.run_folder`:
new run, resume, refusal, or "finished"), builds a :class:`Trainer` and calls :meth:`Trainer.fit`. Every rank
runs the same code; only the main process writes files or logs. The sequence:

1. The launch: the Accelerator (DDP over gloo on CPU, NCCL on GPU); the main process clears the folder
   (``train.overwrite``), completes an interrupted ``best/`` write and removes dead writers' temp files.
2. The data: the shards (the main process writes them from ``data.root`` if needed), the class map + sample
   counts from ``dataset.json``, the run's length.
3. The model parts: the model with the backbone's own preprocessing, layer ids, named param groups, and the
   unfreeze timetable; one optimizer holds every parameter for the whole run (frozen ones simply have
   no gradient), so optimizer state survives phase changes and resumes. Then the loaders.
4. Resume from ``last.pt`` if the plan says so (:mod:`trainer.checkpoint.checkpointer`); the tracker and reporter.
   Then epochs (:meth:`Trainer.train_epoch`): at a phase change
   ``freezing.apply_phase`` sets ``requires_grad`` and the model is re-wrapped in DDP; each optimizer
   step sets every group's lr from the pure schedule; ranks agree on preemption every
   ``train.preempt_check_every_steps`` steps. After each epoch (:meth:`Trainer.end_epoch`): evaluate (raw and
   EMA weights), reports, ``checkpoints/best/`` when the monitored metric improves, early stopping
   (:mod:`trainer.train.evaluation`), ``last.pt`` (also written at the configured interval and on preemption).
   ``finetune.strategy`` linear_probe / lp_ft first solves the head (:mod:`trainer.train.probe_stage`).
5. When the data has a test split: ``checkpoints/best/`` evaluated on it once (``test/...`` in metrics.jsonl,
   ``reports/test_*``; :mod:`trainer.train.evaluation`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from trainer.checkpoint import inference as infer_ckpt
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.run_folder import StartPlan
from trainer.checkpoint.state import Progress
from trainer.config.loading import save_config
from trainer.config.run import ResolvedRun, resolve_run
from trainer.config.schema import Config
from trainer.distributed.accelerator import check_replicas, unwrap, wrap_ddp
from trainer.distributed.signals import PreemptionHandler
from trainer.finetune.freezing import apply_phase
from trainer.finetune.schedule import phase_index_at
from trainer.train.budgeted import with_steps
from trainer.train.components import (build_data, build_launch, build_loaders, build_model_parts, build_run_logging,
                                      run_length)
from trainer.train.early_stopping import EarlyStopping
from trainer.train.epoch import train_epoch
from trainer.train.evaluation import Validation, record_validation, test_best_checkpoint, validate

log = logging.getLogger("trainer")


@dataclass
class RunResult:
    """What a finished (or preempted) run reports back."""

    output_dir: Path
    best_top1: float
    last_eval: dict
    step: int
    epoch: int
    preempted: bool
    early_stopped: bool = False


class Trainer:
    """Everything one run needs, built from ``cfg`` (see the module docstring for the sequence): ``launch``,
    ``data``, ``length``, ``parts``, ``loaders``, ``logs`` (:mod:`trainer.train.components`), the early ``stopper``,
    the checkpointer ``ckpt`` and the run's ``progress``. The parts' most read fields are attributes too
    (``model``, ``optimizer``, ``ema``, ``fcache``, ``dataset``, ``class_names``, ``steps_epoch``, ``tracker`` ...).

    Raises (from the constructor):
        ConfigError: config fields that do not fit the data, the launch or the checkpoint being
            resumed (names the field or file).
        trainer.checkpoint.state.CheckpointError: an unreadable checkpoint (names the file).
    """

    def __init__(self, cfg: Config, plan: StartPlan | None = None, resolved: ResolvedRun | None = None):
        self.launch = launch = build_launch(resolved or resolve_run(cfg), plan)  # resolve_run: once per process
        self.cfg = launch.cfg  # replaced when the budget keeper sets a new length (set_length)
        set_seed(self.cfg.train.seed)
        self.data = build_data(launch, current_cfg=lambda: self.cfg)
        self.length = run_length(self.cfg, self.data.steps_epoch)
        self.parts = m = build_model_parts(launch, self.data)
        self.loaders = build_loaders(launch, self.data, m)
        self.stopper = EarlyStopping.from_config(self.cfg.train.early_stopping)  # checkpoints/best/ + early stopping
        self.ckpt = Checkpointer(self.cfg, launch.out_dir, launch.accelerator, model=m.model, optimizer=m.optimizer,
                                 param_names=m.param_names, stopper=self.stopper, ema=m.ema,
                                 class_names=self.data.class_names, preprocessing=m.pre.to_dict(),
                                 resumed_from=launch.plan.resumed_from)
        last = launch.plan.last
        self.progress, wandb_run_id = self.ckpt.restore(last) if last is not None else (Progress(), None)
        self.logs = build_run_logging(launch, self.data, self.length, self.progress, wandb_run_id)
        self.preemption = PreemptionHandler()  # installed for the duration of fit()
        # the parts' fields callers read by name
        self.accelerator, self.is_main, self.world_size, self.out_dir = (launch.accelerator, launch.is_main,
                                                                         launch.world_size, launch.out_dir)
        d = self.data
        self.dataset, self.class_names, self.steps_epoch = d.dataset, d.class_names, d.steps_epoch
        self.model, self.optimizer, self.param_names, self.l2_sp, self.ema, self.fcache = (
            m.model, m.optimizer, m.param_names, m.l2_sp, m.ema, m.fcache)
        self.tracker, self.reporter = self.logs.tracker, self.logs.reporter

    total_steps = property(lambda self: self.length.total_steps, doc="Optimizer steps run (RunLength).")
    schedule_steps = property(lambda self: self.length.schedule_steps, doc="The lr schedule's steps (RunLength).")
    num_epochs = property(lambda self: self.length.num_epochs, doc="Epochs gone through (RunLength).")

    def save_last(self, reason: str) -> None:
        """Write the resume checkpoint (:meth:`Checkpointer.save_last`); every rank must call it."""
        self.ckpt.save_last(self.progress, reason, self.tracker.run_id)

    # ---- training ---------------------------------------------------------------------------
    def enter_phase(self, pidx: int, epoch: int) -> torch.nn.Module:
        """Apply unfreeze phase ``pidx`` (starting at ``epoch``); return the model (re)wrapped in DDP."""
        m = self.parts
        summary = apply_phase(unwrap(m.model), m.layer_of, m.num_layers, m.phases[pidx],
                              frozen_bn=self.cfg.finetune.frozen_bn, bn_stats=self.cfg.finetune.bn_stats)
        log.info("epoch %d: phase %d %s: %s", epoch, pidx, m.phases[pidx], summary)
        return wrap_ddp(unwrap(self.model), self.accelerator)

    def train_epoch(self, ddp_model: torch.nn.Module, progress_bar=None) -> tuple[bool, int, dict | None]:
        """Optimizer steps of ``ddp_model`` (from :meth:`enter_phase`) to the end of the current epoch; returns
        (preempted, bad samples skipped over all ranks, the epoch's last mid-epoch evaluation record or None):
        :func:`trainer.train.epoch.train_epoch`."""
        return train_epoch(self, ddp_model, progress_bar)

    def set_length(self, steps: int) -> None:
        """The run's length becomes ``steps`` optimizer steps (the budget keeper's new count); the lr schedule
        is shaped over them from here on, and the checkpoints record it as ``train.steps``."""
        every = self.launch.run_plan.overrides.get("train.eval_every_steps", self.cfg.train.eval_every_steps)
        self.cfg = self.ckpt.cfg = with_steps(self.cfg, steps, eval_every_steps=every)
        self.length = run_length(self.cfg, self.steps_epoch)
        if self.is_main:
            save_config(self.cfg, self.out_dir / "config.yaml")  # the config this folder's run trains with

    def linear_probe(self) -> int:
        """``finetune.strategy`` linear_probe / lp_ft: the head solved on frozen features
        (:func:`trainer.train.probe_stage.probe_for_run`); returns bad samples skipped (this rank)."""
        from trainer.train.probe_stage import probe_for_run

        ld = self.loaders
        return probe_for_run(unwrap(self.model), train_shards=self.dataset.train_shards, val_loader=ld.eval,
                             transform=ld.eval_transform, loader_kwargs=ld.common,
                             micro_batch_size=ld.eval_batch_size, criterion=self.parts.criterion,
                             accelerator=self.accelerator, finetune_cfg=self.cfg.finetune, tracker=self.tracker,
                             ema=self.ema, num_train=self.dataset.num_train_samples)

    def validate(self) -> Validation:
        """The raw (and EMA) weights on the validation split (:func:`trainer.train.evaluation.validate`)."""
        return validate(unwrap(self.model), self.ema, self.loaders.eval, self.fcache, reporter=self.reporter,
                        num_classes=len(self.class_names), accelerator=self.accelerator,
                        monitor=self.stopper.monitor, mode=self.stopper.mode, multilabel=self.parts.multilabel)

    def evaluate_now(self, extra: dict) -> dict:
        """Validate and record it (log with ``extra``, early stopping, ``checkpoints/best/``, reports:
        :func:`trainer.train.evaluation.record_validation`); return the monitored weights' ``val/*`` record."""
        t0 = time.perf_counter()
        v = self.validate()
        if self.data.keeper is not None:
            self.data.keeper.record_eval(time.perf_counter() - t0)
        record_validation(v, self.progress, extra=extra, tracker=self.tracker, stopper=self.stopper,
                          checkpointer=self.ckpt, reporter=self.reporter, is_main=self.is_main)
        return v.chosen

    def end_epoch(self, num_skipped: int) -> dict | None:
        """Evaluate, log (with ``num_skipped`` bad samples of the epoch), update reports / ``checkpoints/best/`` /
        early stopping, write ``last.pt``.

        Returns:
            The evaluation's log record (``val/top1``, ``val/loss``, ... and ``val/confusion``); None when the
            run is measured in ``train.steps`` with ``eval_every_steps`` and this is not its end (no evaluation).
        """
        p = self.progress
        if p.step >= (p.epoch + 1) * self.steps_epoch:  # not after a max_steps stop mid-epoch
            p.epoch += 1
        extra = {"epoch": p.epoch, "samples_seen": p.samples_seen, "data/skipped": num_skipped}
        if self.world_size > 1:
            extra["ddp/replica_max_abs_diff"] = check_replicas(unwrap(self.model), self.accelerator)
        if self.cfg.train.steps and self.cfg.train.eval_every_steps and 0 < p.step < self.total_steps:
            self.save_last("epoch")  # a run in steps evaluates every eval_every_steps and at its end only
            return None
        last_eval = self.evaluate_now(extra)
        self.save_last("epoch")
        return last_eval

    def fit(self) -> RunResult:
        """Train until ``train.epochs`` / ``max_steps``, early stopping or preemption; return the result."""
        cfg, p = self.cfg, self.progress
        preempted, last_eval, phase, ddp_model = False, {}, None, None
        bar = None
        if self.is_main and cfg.logging.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=p.step, unit="step", dynamic_ncols=True)
        self.preemption.install()
        try:
            if self.stopper.should_stop:
                log.info("early stopping: stopped before (%s did not improve for %d evaluations); nothing to do",
                         self.stopper.monitor, self.stopper.wait)
            if cfg.finetune.strategy != "epochs" and p.step == 0 and p.epoch == 0 and p.eval_step < 0:  # once
                phase = phase_index_at(self.parts.phases, 0)
                ddp_model = self.enter_phase(phase, 0)
                num_skipped = self.linear_probe()
                if cfg.finetune.strategy == "linear_probe":  # the run is the probe
                    p.epoch = self.num_epochs
                # evaluate, best, last.pt; for lp_ft the probe is the first candidate for checkpoints/best
                last_eval = self.end_epoch(num_skipped)
            while p.epoch < self.num_epochs and p.step < self.total_steps and not self.stopper.should_stop:
                if phase_index_at(self.parts.phases, p.epoch) != phase:
                    phase = phase_index_at(self.parts.phases, p.epoch)
                    ddp_model = self.enter_phase(phase, p.epoch)
                preempted, num_skipped, mid_eval = self.train_epoch(ddp_model, bar)
                last_eval = mid_eval or last_eval
                if preempted or self.stopper.should_stop:  # stopped early at an eval_every_steps evaluation
                    break
                last_eval = self.end_epoch(num_skipped) or last_eval
            if not preempted:
                test_best_checkpoint(self.out_dir, infer_ckpt.best_dir(self.out_dir), self.dataset.test_shards,
                                     accelerator=self.accelerator, tracker=self.tracker, step=p.step,
                                     num_workers=cfg.data.num_workers, micro_batch_size=self.loaders.eval_batch_size)
            self.reporter.finish(p.step)
        finally:
            self.preemption.restore()
            if bar is not None:
                bar.close()
            if self.fcache is not None:
                self.fcache.clear()  # frees RAM, deletes spill files
            self.tracker.close()
        self.accelerator.wait_for_everyone()
        return RunResult(output_dir=self.out_dir, best_top1=p.best_top1, last_eval=last_eval, step=p.step,
                         epoch=p.epoch, preempted=preempted, early_stopped=self.stopper.should_stop)
