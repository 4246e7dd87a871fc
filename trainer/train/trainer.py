"""One training run: wires config, data, model, freezing, optimizer, loop, checkpoints and tracking.

:func:`trainer.train.start.run` decides what to do with ``train.output_dir`` (:mod:`trainer.checkpoint.run_folder`:
new run, resume, refusal, or "finished"), builds a :class:`Trainer` and calls :meth:`Trainer.fit`. Every rank
runs the same code; only the main process writes files or logs. The sequence:

1. Build the Accelerator (DDP over gloo on CPU, NCCL on GPU) and check the world size; the main
   process clears the folder (``train.overwrite``), completes an interrupted ``best/`` write and
   removes dead writers' temp files.
2. Make sure the shards exist (the main process writes them from ``data.root`` if needed) and read
   the class map + sample counts from ``dataset.json``.
3. Build the model with the backbone's own preprocessing, layer ids, named param groups, and the
   unfreeze timetable; one optimizer holds every parameter for the whole run (frozen ones simply have
   no gradient), so optimizer state survives phase changes and resumes.
4. Resume from ``last.pt`` if the plan says so. Then epochs (:meth:`Trainer.train_epoch`): at a phase change
   ``freezing.apply_phase`` sets ``requires_grad`` and the model is re-wrapped in DDP; each optimizer
   step sets every group's lr from the pure schedule; ranks agree on preemption every
   ``train.preempt_check_every_steps`` steps. After each epoch (:meth:`Trainer.end_epoch`): evaluate (raw and
   EMA weights), reports, ``checkpoints/best/`` when the monitored metric improves, early stopping
   (:mod:`trainer.train.evaluation`), ``last.pt`` (also written at the configured interval and on preemption;
   :mod:`trainer.checkpoint.checkpointer`). ``finetune.strategy`` linear_probe / lp_ft first solves the head
   (:mod:`trainer.train.linear_probe`).
5. When the data has a test split: ``checkpoints/best/`` evaluated on it once (``test/...`` in metrics.jsonl,
   ``reports/test_*``; :mod:`trainer.train.evaluation`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import set_seed

from trainer.cli.errors import set_log_dir
from trainer.config.run import ResolvedRun, resolve_run
from trainer.config.loading import grad_accum_steps, save_config
from trainer.config.schema import Config, ConfigError
from trainer.data.batch_augment import build_batch_augment
from trainer.data.loader import WORKER_NICE, WORKER_TORCH_THREADS, build_run_loaders
from trainer.data.prepare import prepare_dataset
from trainer.data.sources import steps_per_epoch
from trainer.distributed.accelerator import check_replicas, describe_threads, make_accelerator, unwrap, wrap_ddp
from trainer.distributed.signals import PreemptionHandler
from trainer.finetune.freezing import apply_phase
from trainer.finetune.l2sp import StartingPointDecay
from trainer.finetune.losses import build_criterion
from trainer.finetune.optim import build_optimizer, set_lrs
from trainer.finetune.schedule import build_phases_for, phase_index_at
from trainer.models.build import build_model
from trainer.models.layers import layer_ids
from trainer.reporting.reporter import Reporter
from trainer.reporting.tracking import Tracker
from trainer.reporting.train_meter import TrainMeter
from trainer.checkpoint import inference as infer_ckpt
from trainer.checkpoint.state import Progress
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.train.early_stopping import EarlyStopping
from trainer.train.ema import ModelEma
from trainer.train.evaluation import Validation, record_validation, records_to_redo, test_best_checkpoint, validate
from trainer.train.budgeted import BudgetKeeper, epochs_for, evals_between, plan_for_run, save_plan, with_steps
from trainer.train.feature_cache import FeatureCache, feature_cache_budget
from trainer.train.loop import train_step
from trainer.checkpoint.run_folder import StartPlan, plan_start, prepare_folder

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
    """Everything one run needs, built from ``cfg`` (see the module docstring for the sequence).

    Raises (from the constructor):
        ConfigError: config fields that do not fit the data, the launch or the checkpoint being
            resumed (names the field or file).
        trainer.checkpoint.state.CheckpointError: an unreadable checkpoint (names the file).
    """

    def __init__(self, cfg: Config, plan: StartPlan | None = None, resolved: ResolvedRun | None = None):
        resolved = resolved or resolve_run(cfg)  # once per process: the entry point passes its own
        self.cfg = cfg = resolved.config  # train.mixed_precision resolved; config.yaml records it
        self.accelerator = make_accelerator(cfg.train.mixed_precision, timeout_s=cfg.train.dist_timeout_s)
        self.is_main = self.accelerator.is_main_process
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format=f"[rank {self.accelerator.process_index}] %(levelname)s %(message)s")
        self.world_size = self.accelerator.num_processes
        self.out_dir = Path(cfg.train.output_dir)
        self.plan = plan or plan_start(cfg)
        # a budgeted run: its plan (made by rank 0, or read back), before anything is written
        self.cfg, self.run_plan, new_plan = plan_for_run(cfg, resolved, self.accelerator, self.out_dir)
        cfg = self.cfg
        self.accum = grad_accum_steps(cfg, self.world_size)
        set_log_dir(self.out_dir)  # the start is accepted: from here on a user error's traceback goes to logs/
        if self.is_main:  # the run folder as the plan says: created, cleared, no dead writers' files, rewound
            self.out_dir.mkdir(parents=True, exist_ok=True)
            prepare_folder(self.plan, self.out_dir)
            if new_plan:
                save_plan(self.run_plan, self.out_dir)
        self.accelerator.wait_for_everyone()
        set_seed(cfg.train.seed)
        self._setup_data()
        self._setup_model()
        self._setup_loaders()
        self.stopper = EarlyStopping.from_config(cfg.train.early_stopping)  # checkpoints/best/ + early stopping
        self.ckpt = Checkpointer(cfg, self.out_dir, self.accelerator, model=self.model, optimizer=self.optimizer,
                                 param_names=self.param_names, stopper=self.stopper, ema=self.ema,
                                 class_names=self.class_names, preprocessing=self.pre.to_dict(),
                                 resumed_from=self.plan.resumed_from)
        self.progress, wandb_run_id = Progress(), None
        last = self.plan.last
        if last is not None:
            self.progress, wandb_run_id = self.ckpt.restore(last)
        self.tracker = Tracker.disabled()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")  # the config this folder's run trains with
            # resume: records after the checkpoint's step rewound (and those at it it lacks); restart: all of them
            resume_step = self.progress.step if last is not None else -1 if self.plan.action == "restart" else None
            redo = records_to_redo(self.progress, self.out_dir) if last is not None else ()
            self.tracker = Tracker(self.out_dir, cfg.to_dict(), mode=cfg.logging.wandb,
                                   project=cfg.logging.project, entity=cfg.logging.entity,
                                   run_name=cfg.logging.run_name or cfg.name, run_id=wandb_run_id,
                                   resume_step=resume_step, redo=redo)
            log.info("world_size=%d micro_batch_size=%d grad_accum_steps=%d global_batch_size=%d "
                     "steps/epoch=%d total_steps=%d classes=%d mixed_precision=%s", self.world_size,
                     cfg.train.micro_batch_size, self.accum, cfg.train.global_batch_size, self.steps_epoch,
                     self.total_steps, len(self.class_names), cfg.train.mixed_precision)
            log.info("threads: %s", describe_threads(cfg.data.num_workers, WORKER_TORCH_THREADS, WORKER_NICE))
        self.reporter = Reporter(self.out_dir, self.class_names, self.accelerator, self.tracker)
        self.preemption = PreemptionHandler()  # installed for the duration of fit()

    # ---- set-up -----------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.cfg
        self.dataset = prepare_dataset(cfg.data, self.accelerator,
                                       progress=cfg.logging.progress and self.accelerator.is_main_process)
        self.class_names = self.dataset.meta.classes
        self.steps_epoch = steps_per_epoch(self.dataset.num_train_samples, cfg.train.global_batch_size)
        # the lr schedule always spans the configured epochs; max_steps only stops the run early, so a
        # run stopped by max_steps and resumed follows the same lrs as an uninterrupted one
        self._apply_length()
        if cfg.optim.warmup_steps > self.schedule_steps:
            raise ConfigError(f"optim.warmup_steps ({cfg.optim.warmup_steps}) is longer than the whole run "
                              f"({self.schedule_steps} steps: train.steps, or train.epochs x {self.steps_epoch} "
                              "steps per epoch)")
        self.keeper = None if self.run_plan is None or cfg.finetune.strategy == "linear_probe" else BudgetKeeper(
            self.run_plan, self.out_dir, self.accelerator,
            evals_between=lambda a, b: evals_between(self.cfg, self.steps_epoch, a, b),
            warmup_steps=cfg.optim.warmup_steps)

    def _setup_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if cfg.model.weights in ("default", "imagenet"):
            # library weights: local rank 0 of each node fetches + verifies the cached file (fast failure
            # offline, naming the file); the others wait, then find it in the cache (trainer/models/weights.py)
            from trainer.models.weights import ensure_weights
            ensure_weights(cfg.model.backbone, local_rank=acc.local_process_index, barrier=acc.wait_for_everyone)
        with acc.local_main_process_first():
            model, pre = build_model(cfg.model.backbone, len(self.class_names), cfg.model.weights,
                                     drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate,
                                     channels_last=cfg.model.channels_last)
        # data.image_size: train, evaluate and save (predict/export) at that size, the rest as pretrained
        self.pre = model.preprocessing = dataclasses.replace(pre, input_size=cfg.data.image_size or pre.input_size)
        model.to(acc.device)
        if cfg.model.compile:  # in place: parameter names / state_dict keys stay as they are
            model.compile()
        self.model = model
        self.layer_of, self.num_layers = layer_ids(model, cfg.model.backbone)
        self.phases = build_phases_for(cfg, self.num_layers)
        optimizer, self.groups, self.param_names = build_optimizer(model, self.layer_of, self.num_layers,
                                                                   cfg.optim, cfg.finetune)
        # L2-SP pulls toward the weights as built (pretrained), before any checkpoint is restored
        self.l2_sp = StartingPointDecay(optimizer, self.groups, head_layer_id=self.num_layers - 1,
                                        strength=cfg.finetune.l2_sp) if cfg.finetune.l2_sp else None
        self.optimizer = acc.prepare_optimizer(optimizer)
        self.batch_augment = build_batch_augment(cfg.data, num_classes=len(self.class_names),
                                                 label_smoothing=cfg.optim.label_smoothing, device=acc.device,
                                                 normalize=model.normalize)
        self.multilabel = cfg.data.task == "multilabel"
        self.criterion = build_criterion(cfg.optim, self.dataset.meta.splits["train"].class_counts,
                                         class_names=self.class_names, device=acc.device,
                                         soft_targets=self.batch_augment is not None and self.batch_augment.soft_targets,
                                         multilabel=self.multilabel,
                                         num_samples=self.dataset.num_train_samples)
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.fcache = FeatureCache(seed=cfg.train.seed, rank=acc.process_index,
                                   micro_batch_size=cfg.train.micro_batch_size, spill_dir=self.out_dir / "feature_cache",
                                   **feature_cache_budget(cfg.train.feature_cache_max_ram_fraction, self.world_size)) \
            if cfg.train.feature_cache else None

    def _setup_loaders(self) -> None:
        acc = self.accelerator
        r = build_run_loaders(self.cfg, self.pre, rank=acc.process_index, world_size=self.world_size,
                              device_type=acc.device.type, train_shards=self.dataset.train_shards,
                              val_shards=self.dataset.val_shards, num_classes=len(self.class_names))
        self.train_loader, self.eval_loader, self.eval_batch_size = r.train, r.eval, r.eval_batch_size
        self.eval_tf, self.loader_common = r.eval_transform, r.common  # the linear probe reads the train split

    def save_last(self, reason: str) -> None:
        """Write the resume checkpoint (:meth:`Checkpointer.save_last`); every rank must call it."""
        self.ckpt.save_last(self.progress, reason, self.tracker.run_id)

    # ---- training ---------------------------------------------------------------------------
    def enter_phase(self, pidx: int, epoch: int) -> torch.nn.Module:
        """Apply unfreeze phase ``pidx`` (starting at ``epoch``); return the model (re)wrapped in DDP."""
        summary = apply_phase(unwrap(self.model), self.layer_of, self.num_layers, self.phases[pidx],
                              frozen_bn=self.cfg.finetune.frozen_bn, bn_stats=self.cfg.finetune.bn_stats)
        log.info("epoch %d: phase %d %s: %s", epoch, pidx, self.phases[pidx], summary)
        return wrap_ddp(unwrap(self.model), self.accelerator)

    def _epoch_batches(self, epoch: int, done_in_epoch: int, skipped: list[str]) -> Iterator[dict]:
        """This epoch's micro-batches from the first one not yet trained; bad-sample reports go to ``skipped``."""
        n = self.steps_epoch * self.accum
        batches = self.train_loader.epoch(epoch, n)
        if self.fcache is not None:  # frozen backbone: record features in the first epoch, then reuse them
            batches = self.fcache.train_batches(unwrap(self.model), batches, epoch=epoch, num_batches=n,
                                                start_batch=done_in_epoch * self.accum)
        for _ in range(done_in_epoch * self.accum):  # resume mid-epoch: replay the same stream
            next(batches)
        for b in batches:
            skipped.extend(b.get("skipped") or [])
            yield b

    def train_epoch(self, ddp_model: torch.nn.Module, progress_bar=None) -> tuple[bool, int, dict | None]:
        """Optimizer steps of ``ddp_model`` (from :meth:`enter_phase`) until the end of the current epoch
        (or ``max_steps``, preemption, or early stopping at a ``train.eval_every_steps`` evaluation).

        Returns:
            (True if the ranks agreed to stop for a preemption signal (``last.pt`` is then written),
            number of bad samples skipped this epoch over all ranks, the record of the epoch's last
            ``eval_every_steps`` evaluation or None).
        """
        cfg, acc, p = self.cfg, self.accelerator, self.progress
        epoch_start = p.epoch * self.steps_epoch
        skipped: list[str] = []
        stream = self._epoch_batches(p.epoch, p.step - epoch_start, skipped)
        meter, preempted, last_eval = TrainMeter(acc, p.samples_seen), False, None
        every, epoch_end = cfg.train.eval_every_steps, min(epoch_start + self.steps_epoch, self.total_steps)
        ddp_model.train()
        while p.step < epoch_start + self.steps_epoch and p.step < self.total_steps:
            lrs = set_lrs(self.optimizer, self.groups, step=p.step, total_steps=self.schedule_steps,
                          phases=self.phases, steps_per_epoch=self.steps_epoch, optim_cfg=self.cfg.optim,
                          head_layer_id=self.num_layers - 1)
            meter.add(train_step(ddp_model, stream, optimizer=self.optimizer, criterion=self.criterion,
                                   accelerator=acc, grad_accum_steps=self.accum, grad_clip=cfg.optim.grad_clip,
                                   batch_augment=self.batch_augment))
            if self.l2_sp is not None:
                self.l2_sp.step()
            p.step += 1
            if self.keeper is not None and (steps := self.keeper.after_step(p.step, self.total_steps)):
                self.set_length(steps)
            if self.ema is not None:
                self.ema.update(unwrap(self.model), p.step)
            p.samples_seen += cfg.train.global_batch_size
            if progress_bar is not None:
                progress_bar.update(1)
            if p.step % cfg.train.log_every_steps == 0 or p.step == epoch_start + self.steps_epoch:
                rec = meter.record(epoch=p.epoch, samples_seen=p.samples_seen, lrs=lrs)  # the only sync
                self.tracker.log(rec, step=p.step)
                if progress_bar is not None:
                    progress_bar.set_postfix(loss=f"{rec['train/loss']:.3f}", ips=f"{rec['train/images_per_s']:.1f}")
            every = self.cfg.train.eval_every_steps  # a new step count (the budget keeper) rescales it
            # not at an epoch's end, which evaluates anyway; a run in steps (whose epoch ends do not, end_epoch):
            # not within a quarter interval of its own end
            if every and p.step % every == 0 and ((self.total_steps - p.step) * 4 > every if self.cfg.train.steps
                                                  else p.step < epoch_end):
                last_eval = self.evaluate_now({"epoch": p.epoch, "samples_seen": p.samples_seen})
                if self.stopper.should_stop:
                    self.save_last("early stopping")
                    break
            check_now = p.step % cfg.train.preempt_check_every_steps == 0  # same steps on every rank
            if check_now and self.preemption.should_stop(acc):
                preempted = True
                break
            if p.step < epoch_end and self.ckpt.interval_due(p.step, check_now):  # the epoch's end writes one
                self.save_last("interval")
        num_skipped = acc.reduce(torch.tensor(float(len(skipped)), device=acc.device),
                                 reduction="sum").item() if self.world_size > 1 else len(skipped)
        for s in skipped:
            log.warning("skipped bad sample %s", s)
        if preempted:
            self.save_last(f"preempted (signal {self.preemption.agreed_signal})")
        return preempted, num_skipped, last_eval

    def _apply_length(self) -> None:
        """The run's length from ``self.cfg``: the lr schedule's steps (``train.steps``, else the epochs'), the
        steps run (``max_steps`` may stop earlier) and the epochs gone through."""
        t = self.cfg.train
        self.schedule_steps = self.total_steps = t.steps or self.steps_epoch * t.epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.num_epochs = epochs_for(self.cfg, self.steps_epoch)

    def set_length(self, steps: int) -> None:
        """The run's length becomes ``steps`` optimizer steps (the budget keeper's new count); the lr schedule
        is shaped over them from here on, and the checkpoints record it as ``train.steps``."""
        every = self.run_plan.overrides.get("train.eval_every_steps", self.cfg.train.eval_every_steps)
        self.cfg = self.ckpt.cfg = with_steps(self.cfg, steps, eval_every_steps=every)
        self._apply_length()
        if self.is_main:
            save_config(self.cfg, self.out_dir / "config.yaml")  # the config this folder's run trains with

    def linear_probe(self) -> int:
        """``finetune.strategy`` linear_probe / lp_ft: the head solved on frozen features
        (:func:`trainer.train.linear_probe.probe_for_run`); returns bad samples skipped (this rank)."""
        from trainer.train.linear_probe import probe_for_run

        return probe_for_run(unwrap(self.model), train_shards=self.dataset.train_shards, val_loader=self.eval_loader,
                             transform=self.eval_tf, loader_kwargs=self.loader_common,
                             micro_batch_size=self.eval_batch_size, criterion=self.criterion,
                             accelerator=self.accelerator, finetune_cfg=self.cfg.finetune, tracker=self.tracker,
                             ema=self.ema, num_train=self.dataset.num_train_samples)

    def validate(self) -> Validation:
        """The raw (and EMA) weights on the validation split (:func:`trainer.train.evaluation.validate`)."""
        return validate(unwrap(self.model), self.ema, self.eval_loader, self.fcache, reporter=self.reporter,
                        num_classes=len(self.class_names), accelerator=self.accelerator,
                        monitor=self.stopper.monitor, mode=self.stopper.mode, multilabel=self.multilabel)

    def evaluate_now(self, extra: dict) -> dict:
        """Validate and record it (log with ``extra``, early stopping, ``checkpoints/best/``, reports:
        :func:`trainer.train.evaluation.record_validation`); return the monitored weights' ``val/*`` record."""
        t0 = time.perf_counter()
        v = self.validate()
        if self.keeper is not None:
            self.keeper.record_eval(time.perf_counter() - t0)
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
                phase = phase_index_at(self.phases, 0)
                ddp_model = self.enter_phase(phase, 0)
                num_skipped = self.linear_probe()
                if cfg.finetune.strategy == "linear_probe":  # the run is the probe
                    p.epoch = self.num_epochs
                # evaluate, best, last.pt; for lp_ft the probe is the first candidate for checkpoints/best
                last_eval = self.end_epoch(num_skipped)
            while p.epoch < self.num_epochs and p.step < self.total_steps and not self.stopper.should_stop:
                if phase_index_at(self.phases, p.epoch) != phase:
                    phase = phase_index_at(self.phases, p.epoch)
                    ddp_model = self.enter_phase(phase, p.epoch)
                preempted, num_skipped, mid_eval = self.train_epoch(ddp_model, bar)
                last_eval = mid_eval or last_eval
                if preempted or self.stopper.should_stop:  # stopped early at an eval_every_steps evaluation
                    break
                last_eval = self.end_epoch(num_skipped) or last_eval
            if not preempted:
                test_best_checkpoint(self.out_dir, infer_ckpt.best_dir(self.out_dir), self.dataset.test_shards,
                                     accelerator=self.accelerator, tracker=self.tracker, step=p.step,
                                     num_workers=cfg.data.num_workers, micro_batch_size=self.eval_batch_size)
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
