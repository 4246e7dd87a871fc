"""The run's checkpoint writes: the resume checkpoint (``last.pt``, or step files with
``train.keep_checkpoints`` > 1: :mod:`trainer.checkpoint.files`) and when it is due, the inference
checkpoint ``checkpoints/best/``, and restoring a resume checkpoint into the run's objects.

:class:`Checkpointer` holds the objects a checkpoint is built from (model, optimizer, EMA, early stopping, ...)
as constructor state; the file formats are :mod:`trainer.checkpoint.state` (``last.pt``) and
:mod:`trainer.checkpoint.inference` (``best/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from trainer.config.schema import Config
from trainer.distributed.accelerator import unwrap
from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint import inference as infer_ckpt
from trainer.checkpoint.state import Progress
from trainer.checkpoint.files import save_resume

log = logging.getLogger("trainer")


class Checkpointer:
    """Writes and restores the checkpoints of one run.

    Args:
        cfg: the run's config (backbone, batch size, intervals; stored in the checkpoints).
        out_dir: ``train.output_dir``. accelerator: the run's Accelerator (rank, gathers, barriers).
        model: the run's plain (or compiled) model. optimizer: Accelerate's optimizer wrapper.
        param_names: ``id(param) -> name`` (optimizer state by name). stopper: the run's
            :class:`trainer.train.early_stopping.EarlyStopping`. ema: its ``ModelEma`` or None.
        class_names: the class map. preprocessing: ``Preprocessing.to_dict()`` of the model.
        resumed_from: the ``train.resume_from`` checkpoint name this run continues (stored in each checkpoint).
    """

    def __init__(self, cfg: Config, out_dir: Path, accelerator, *, model: torch.nn.Module, optimizer,
                 param_names: dict[int, str], stopper, ema, class_names: list[str], preprocessing: dict,
                 resumed_from: str | None = None):
        self.cfg, self.out_dir, self.accelerator = cfg, Path(out_dir), accelerator
        self.model, self.optimizer, self.param_names = model, optimizer, param_names
        self.stopper, self.ema, self.class_names, self.preprocessing = stopper, ema, class_names, preprocessing
        self.is_main, self.world_size = accelerator.is_main_process, accelerator.num_processes
        self.resumed_from = resumed_from
        self._last_time = time.monotonic()

    def restore(self, path: Path) -> tuple[Progress, str | None]:
        """Load a resume checkpoint into the model, optimizer, scaler, early stopping, EMA and RNG (see
        :func:`trainer.checkpoint.state.restore_resume_state`); return (progress, W&B run id)."""
        cfg, acc = self.cfg, self.accelerator
        return ckpt_lib.restore_resume_state(
            path, model=unwrap(self.model), optimizer=self.optimizer.optimizer, param_names=self.param_names,
            scaler=acc.scaler, early_stopping=self.stopper, class_names=self.class_names,
            backbone=cfg.model.backbone, global_batch_size=cfg.train.global_batch_size,
            rank=acc.process_index, world_size=self.world_size, ema=self.ema)

    def save_last(self, progress: Progress, reason: str, wandb_run_id: str | None) -> None:
        """Write the resume checkpoint (main process, atomically; ``last.pt`` or a step file kept by
        ``train.keep_checkpoints``); every rank must call it (RNG states are gathered)."""
        acc = self.accelerator
        rng_all = acc.gather_for_metrics([ckpt_lib.rng_state()], use_gather_object=True) \
            if self.world_size > 1 else [ckpt_lib.rng_state()]
        if self.is_main:
            state = ckpt_lib.resume_state(
                model=unwrap(self.model), optimizer=self.optimizer.optimizer, param_names=self.param_names,
                scaler=acc.scaler, rng=rng_all, progress=progress, class_names=self.class_names,
                backbone=self.cfg.model.backbone, preprocessing=self.preprocessing, config=self.cfg.to_dict(),
                early_stopping=self.stopper.state_dict(), wandb_run_id=wandb_run_id, reason=reason, ema=self.ema,
                resumed_from=self.resumed_from)
            path = save_resume(state, self.out_dir, progress.step, keep=self.cfg.train.keep_checkpoints)
            log.info("saved %s at step %d (%s)", path.name, progress.step, reason)
        acc.wait_for_everyone()
        self._last_time = time.monotonic()

    def stage(self, progress: Progress) -> str:
        """Which stage of the run produced weights at ``progress``: ``linear_probe`` (the probe's head, step 0
        of ``finetune.strategy`` linear_probe / lp_ft), else ``training`` (recorded in ``checkpoints/best/``)."""
        probe = self.cfg.finetune.strategy in ("linear_probe", "lp_ft") and progress.step == 0
        return "linear_probe" if probe else "training"

    def save_best(self, progress: Progress, metrics: dict, weights: str = "raw",
                  thresholds: list[float] | None = None) -> None:
        """Write the inference checkpoint ``checkpoints/best/`` (main process) for the current weights and
        their evaluation ``metrics`` (:mod:`trainer.checkpoint.inference`).

        Args:
            weights: ``raw`` (the trained weights) or ``ema`` (the EMA copy, ``train.ema_decay``); recorded
                as ``metrics["weights"]``.
            thresholds: multi-label runs: the per-class thresholds chosen on validation, saved as ``thresholds``
                in ``model.json`` (class order).
        """
        if self.is_main:
            model = self.ema.module if weights == "ema" else unwrap(self.model)
            infer_ckpt.save(
                infer_ckpt.best_dir(self.out_dir), model.state_dict(), class_names=self.class_names,
                backbone=self.cfg.model.backbone, drop_rate=self.cfg.model.drop_rate,
                preprocessing=self.preprocessing, config=self.cfg.to_dict(),
                metrics={"epoch": progress.epoch, "step": progress.step, "weights": weights,
                         "stage": self.stage(progress), **metrics},
                extra=None if thresholds is None else {"thresholds": [float(t) for t in thresholds]})

    def interval_due(self, step: int, check_now: bool) -> bool:
        """``train.checkpoint_every_steps`` / ``checkpoint_every_minutes`` reached at optimizer step ``step``
        (the same answer on every rank; with several ranks the time test is a collective, made only when
        ``check_now`` is true on all of them)."""
        t = self.cfg.train
        due_steps = bool(t.checkpoint_every_steps) and step % t.checkpoint_every_steps == 0
        due_time = bool(t.checkpoint_every_minutes) and \
            time.monotonic() - self._last_time > 60 * t.checkpoint_every_minutes
        if t.checkpoint_every_minutes and self.world_size > 1:  # clocks differ: a collective, all ranks or none
            flag = torch.tensor(1.0 if due_time else 0.0, device=self.accelerator.device)
            due_time = check_now and self.accelerator.reduce(flag, reduction="sum").item() > 0
        return due_steps or due_time
