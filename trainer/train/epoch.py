"""The step iteration of one epoch: :func:`train_epoch` (what :meth:`trainer.train.trainer.Trainer.train_epoch`
runs) over the stream of :func:`epoch_batches`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

import torch

from trainer.data.loader import TrainLoader
from trainer.distributed.accelerator import unwrap
from trainer.finetune.optim import set_lrs
from trainer.reporting.train_meter import TrainMeter
from trainer.train.feature_cache import FeatureCache
from trainer.train.loop import train_step

if TYPE_CHECKING:
    from trainer.train.trainer import Trainer

log = logging.getLogger("trainer")


def epoch_batches(loader: TrainLoader, fcache: FeatureCache | None, model: torch.nn.Module, *, epoch: int,
                  num_batches: int, start_batch: int, skipped: list[str]) -> Iterator[dict]:
    """Epoch ``epoch``'s micro-batches from batch ``start_batch`` on (a resumed run replays the same stream up to
    it), ``num_batches`` in the whole epoch; each batch's bad-sample reports are appended to ``skipped``.

    Args:
        loader: the train loader (:meth:`trainer.data.loader.TrainLoader.epoch`).
        fcache: the feature cache (frozen backbone: features recorded in the first epoch, then reused), or None.
        model: the plain classifier (:func:`trainer.distributed.accelerator.unwrap`) whose backbone the cache hooks.
    """
    batches = loader.epoch(epoch, num_batches)
    if fcache is not None:
        batches = fcache.train_batches(model, batches, epoch=epoch, num_batches=num_batches, start_batch=start_batch)
    for _ in range(start_batch):  # resume mid-epoch: replay the same stream
        next(batches)
    for b in batches:
        skipped.extend(b.get("skipped") or [])
        yield b


def train_epoch(tr: Trainer, ddp_model: torch.nn.Module, progress_bar=None) -> tuple[bool, int, dict | None]:
    """Optimizer steps of ``ddp_model`` (from :meth:`Trainer.enter_phase`) until the end of ``tr``'s current epoch
    (or ``max_steps``, preemption, or early stopping at a ``train.eval_every_steps`` evaluation). Advances
    ``tr.progress``; logs every ``train.log_every_steps``; writes ``last.pt`` at the interval, on preemption and
    on early stopping (:meth:`Trainer.save_last`); a budget keeper's new step count goes to :meth:`Trainer.set_length`.

    Returns:
        (True if the ranks agreed to stop for a preemption signal (``last.pt`` is then written),
        number of bad samples skipped this epoch over all ranks, the record of the epoch's last
        ``eval_every_steps`` evaluation or None).
    """
    cfg, acc, p, m, accum = tr.cfg, tr.accelerator, tr.progress, tr.parts, tr.launch.accum
    steps_epoch, keeper = tr.data.steps_epoch, tr.data.keeper
    epoch_start = p.epoch * steps_epoch
    skipped: list[str] = []
    stream = epoch_batches(tr.loaders.train, m.fcache, unwrap(m.model), epoch=p.epoch, num_batches=steps_epoch * accum,
                           start_batch=(p.step - epoch_start) * accum, skipped=skipped)
    meter, preempted, last_eval = TrainMeter(acc, p.samples_seen), False, None
    every, epoch_end = cfg.train.eval_every_steps, min(epoch_start + steps_epoch, tr.length.total_steps)
    ddp_model.train()
    while p.step < epoch_start + steps_epoch and p.step < tr.length.total_steps:
        lrs = set_lrs(m.optimizer, m.groups, step=p.step, total_steps=tr.length.schedule_steps, phases=m.phases,
                      steps_per_epoch=steps_epoch, optim_cfg=tr.cfg.optim, head_layer_id=m.num_layers - 1)
        meter.add(train_step(ddp_model, stream, optimizer=m.optimizer, criterion=m.criterion, accelerator=acc,
                             grad_accum_steps=accum, grad_clip=cfg.optim.grad_clip, batch_augment=m.batch_augment))
        if m.l2_sp is not None:
            m.l2_sp.step()
        p.step += 1
        if keeper is not None and (steps := keeper.after_step(p.step, tr.length.total_steps)):
            tr.set_length(steps)
            if progress_bar is not None:  # the bar counts to the new end
                progress_bar.total = tr.length.total_steps
                progress_bar.refresh()
        if m.ema is not None:
            m.ema.update(unwrap(m.model), p.step)
        p.samples_seen += cfg.train.global_batch_size
        if progress_bar is not None:
            progress_bar.update(1)
        if p.step % cfg.train.log_every_steps == 0 or p.step == epoch_start + steps_epoch:
            rec = meter.record(epoch=p.epoch, samples_seen=p.samples_seen, lrs=lrs)  # the only sync
            tr.logs.tracker.log(rec, step=p.step)
            if progress_bar is not None:
                progress_bar.set_postfix(loss=f"{rec['train/loss']:.3f}", ips=f"{rec['train/images_per_s']:.1f}")
        every = tr.cfg.train.eval_every_steps  # a new step count (the budget keeper) rescales it
        # not at an epoch's end, which evaluates anyway; a run in steps (whose epoch ends do not, end_epoch):
        # not within a quarter interval of its own end
        if every and p.step % every == 0 and ((tr.length.total_steps - p.step) * 4 > every if tr.cfg.train.steps
                                              else p.step < epoch_end):
            last_eval = tr.evaluate_now({"epoch": p.epoch, "samples_seen": p.samples_seen})
            if tr.stopper.should_stop:
                tr.save_last("early stopping")
                break
        check_now = p.step % cfg.train.preempt_check_every_steps == 0  # same steps on every rank
        if check_now and tr.preemption.should_stop(acc):
            preempted = True
            break
        if p.step < epoch_end and tr.ckpt.interval_due(p.step, check_now):  # the epoch's end writes one
            tr.save_last("interval")
    num_skipped = acc.reduce(torch.tensor(float(len(skipped)), device=acc.device),
                             reduction="sum").item() if tr.launch.world_size > 1 else len(skipped)
    for s in skipped:
        log.warning("skipped bad sample %s", s)
    if preempted:
        tr.save_last(f"preempted (signal {tr.preemption.agreed_signal})")
    return preempted, num_skipped, last_eval

