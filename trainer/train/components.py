"""The parts one run is made of, each built once, in this order, before the :class:`~trainer.train.trainer.Trainer`
that composes them (as torchtitan builds its components before its trainer):

1. :func:`build_launch` -> :class:`Launch`: the Accelerator, the run folder's plan (and a budgeted run's plan), the
   folder made ready on the main process.
2. :func:`build_data` -> :class:`RunData`: the prepared shards, class names, steps per epoch, the budget keeper;
   :func:`run_length` -> :class:`RunLength`: the lr schedule's steps, the steps run, the epochs.
3. :func:`build_model_parts` -> :class:`ModelParts`: the model and everything that trains it.
4. :func:`build_loaders` -> :class:`trainer.data.loader.RunLoaders`: the train / eval loaders.
5. :func:`build_run_logging` -> :class:`RunLogging`: tracker and reporter, ``config.yaml``, the start log lines
   (after the checkpoint is restored: a resumed run's tracker continues at its step).

Each part is a frozen dataclass named after what it holds; the objects in it (model, optimizer, keeper ...) keep
their own state. The one thing that changes during a run, its length (the budget keeper's new step count), is a
new :class:`RunLength`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from trainer.checkpoint.run_folder import StartPlan, plan_start, prepare_folder
from trainer.checkpoint.state import Progress
from trainer.cli.errors import set_log_dir
from trainer.config.loading import grad_accum_steps, save_config
from trainer.config.run import ResolvedRun
from trainer.config.schema import Config, ConfigError
from trainer.data.batch_augment import BatchAugment, build_batch_augment
from trainer.data.loader import WORKER_NICE, WORKER_TORCH_THREADS, RunLoaders, build_run_loaders
from trainer.data.prepare import PreparedDataset, prepare_dataset
from trainer.data.sources import steps_per_epoch
from trainer.distributed.accelerator import describe_threads, make_accelerator
from trainer.finetune.l2sp import StartingPointDecay
from trainer.finetune.losses import build_criterion
from trainer.finetune.optim import build_optimizer
from trainer.finetune.schedule import build_phases_for
from trainer.models.build import build_model
from trainer.models.classifier import Preprocessing
from trainer.models.layers import layer_ids
from trainer.planner.plan import Plan
from trainer.reporting.reporter import Reporter
from trainer.reporting.tracking import Tracker
from trainer.train.budgeted import BudgetKeeper, epochs_for, evals_between, plan_for_run, save_plan
from trainer.train.ema import ModelEma
from trainer.train.evaluation import records_to_redo
from trainer.train.feature_cache import FeatureCache, feature_cache_budget

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class Launch:
    """This process in the run: ``cfg`` (a budgeted run's planned config), the ``accelerator`` (``world_size``
    processes, ``is_main`` on rank 0), the run folder ``out_dir`` and what this start does with it (``plan``),
    a budgeted run's ``run_plan`` (None otherwise), micro-batches per optimizer step (``accum``)."""

    cfg: Config
    accelerator: Accelerator
    world_size: int
    is_main: bool
    out_dir: Path
    plan: StartPlan
    run_plan: Plan | None
    accum: int


def build_launch(resolved: ResolvedRun, plan: StartPlan | None) -> Launch:
    """The Accelerator (DDP over gloo on CPU, NCCL on GPU), logging set to this rank, the start ``plan``
    (:func:`trainer.checkpoint.run_folder.plan_start` when None), a budgeted run's plan
    (:func:`trainer.train.budgeted.plan_for_run`); the main process then creates / clears / rewinds the run folder
    (:func:`trainer.checkpoint.run_folder.prepare_folder`) and writes a new ``plan.json``. Every rank returns
    after the folder is ready.

    Raises:
        ConfigError: a budgeted run that cannot be planned, gradient accumulation that does not divide.
    """
    cfg = resolved.config  # train.mixed_precision resolved; config.yaml records it
    acc = make_accelerator(cfg.train.mixed_precision, timeout_s=cfg.train.dist_timeout_s)
    is_main = acc.is_main_process
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank {acc.process_index}] %(levelname)s %(message)s")
    out_dir = Path(cfg.train.output_dir)
    plan = plan or plan_start(cfg)
    # a budgeted run: its plan (made by rank 0, or read back), before anything is written
    cfg, run_plan, new_plan = plan_for_run(cfg, resolved, acc, out_dir)
    accum = grad_accum_steps(cfg, acc.num_processes)
    set_log_dir(out_dir)  # the start is accepted: from here on a user error's traceback goes to logs/
    if is_main:  # the run folder as the plan says: created, cleared, no dead writers' files, rewound
        out_dir.mkdir(parents=True, exist_ok=True)
        prepare_folder(plan, out_dir)
        if new_plan:
            save_plan(run_plan, out_dir)
    acc.wait_for_everyone()
    return Launch(cfg=cfg, accelerator=acc, world_size=acc.num_processes, is_main=is_main, out_dir=out_dir,
                  plan=plan, run_plan=run_plan, accum=accum)


@dataclass(frozen=True)
class RunLength:
    """How long the run is, in optimizer steps: ``schedule_steps`` (the lr schedule's span: ``train.steps``, else
    ``train.epochs`` x steps per epoch), ``total_steps`` (steps run: ``train.max_steps`` may stop earlier),
    ``num_epochs`` (epochs gone through)."""

    schedule_steps: int
    total_steps: int
    num_epochs: int


def run_length(cfg: Config, steps_epoch: int) -> RunLength:
    """The run's length from ``cfg.train`` (``steps`` / ``epochs`` / ``max_steps``) and ``steps_epoch`` optimizer
    steps per epoch. The lr schedule always spans the configured length; ``max_steps`` only stops the run early,
    so a run stopped by ``max_steps`` and resumed follows the same lrs as an uninterrupted one."""
    t = cfg.train
    schedule = t.steps or steps_epoch * t.epochs
    total = schedule if t.max_steps is None else min(schedule, t.max_steps)
    return RunLength(schedule_steps=schedule, total_steps=total, num_epochs=epochs_for(cfg, steps_epoch))


@dataclass(frozen=True)
class RunData:
    """The run's data: the ``dataset`` (shards + ``dataset.json``), its ``class_names``, optimizer steps per epoch
    (``steps_epoch``) and, for a budgeted run that trains, the budget ``keeper`` (None otherwise)."""

    dataset: PreparedDataset
    class_names: list[str]
    steps_epoch: int
    keeper: BudgetKeeper | None


def build_data(launch: Launch, current_cfg: Callable[[], Config]) -> RunData:
    """Make sure the shards exist (the main process writes them from ``data.root`` if needed), read the class
    map + sample counts, check the warm-up fits the run and build the budget keeper. ``current_cfg()`` is the
    run's config at the time the keeper asks (its length changes when the keeper sets a new step count).

    Raises:
        ConfigError: a bad ``data.*`` field or shards (:func:`trainer.data.prepare.prepare_dataset`),
            ``optim.warmup_steps`` longer than the whole run.
    """
    cfg, acc = launch.cfg, launch.accelerator
    dataset = prepare_dataset(cfg.data, acc, progress=cfg.logging.progress and acc.is_main_process)
    steps_epoch = steps_per_epoch(dataset.num_train_samples, cfg.train.global_batch_size)
    schedule_steps = run_length(cfg, steps_epoch).schedule_steps
    if cfg.optim.warmup_steps > schedule_steps:
        raise ConfigError(f"optim.warmup_steps ({cfg.optim.warmup_steps}) is longer than the whole run "
                          f"({schedule_steps} steps: train.steps, or train.epochs x {steps_epoch} "
                          "steps per epoch)")
    keeper = None if launch.run_plan is None or cfg.finetune.strategy == "linear_probe" else BudgetKeeper(
        launch.run_plan, launch.out_dir, acc,
        evals_between=lambda a, b: evals_between(current_cfg(), steps_epoch, a, b),
        warmup_steps=cfg.optim.warmup_steps)
    return RunData(dataset=dataset, class_names=dataset.meta.classes, steps_epoch=steps_epoch, keeper=keeper)


@dataclass(frozen=True)
class ModelParts:
    """The model and what trains it: ``model`` (on the device, compiled in place if asked) with its
    preprocessing ``pre``; ``layer_of`` (param -> layer id) / ``num_layers`` and the unfreeze ``phases``; one
    ``optimizer`` over every parameter for the whole run with its named ``groups`` and ``param_names``
    (``id(param)`` -> name); ``l2_sp`` (toward the weights as built, or None); ``batch_augment`` (mixup / cutmix,
    or None); the loss ``criterion``; ``multilabel`` (``data.task``); ``ema`` weights and the feature cache
    ``fcache`` (or None)."""

    model: torch.nn.Module
    pre: Preprocessing
    layer_of: dict
    num_layers: int
    phases: list
    optimizer: torch.optim.Optimizer
    groups: list
    param_names: dict[int, str]
    l2_sp: StartingPointDecay | None
    batch_augment: BatchAugment | None
    criterion: torch.nn.Module
    multilabel: bool
    ema: ModelEma | None
    fcache: FeatureCache | None


def build_model_parts(launch: Launch, data: RunData) -> ModelParts:
    """The model with the backbone's own preprocessing (at ``data.image_size`` when set), layer ids, unfreeze
    timetable, optimizer (prepared by the Accelerator), L2-SP, batch augmentation, loss, EMA and feature cache.
    Library weights are fetched once per node first (:func:`trainer.models.weights.ensure_weights`).

    Raises:
        ConfigError: fields that do not fit the backbone or the data (names the field).
    """
    cfg, acc, n_classes = launch.cfg, launch.accelerator, len(data.class_names)
    if cfg.model.weights in ("default", "imagenet"):
        # library weights: local rank 0 of each node fetches + verifies the cached file (fast failure
        # offline, naming the file); the others wait, then find it in the cache (trainer/models/weights.py)
        from trainer.models.weights import ensure_weights
        ensure_weights(cfg.model.backbone, local_rank=acc.local_process_index, barrier=acc.wait_for_everyone)
    with acc.local_main_process_first():
        model, pre = build_model(cfg.model.backbone, n_classes, cfg.model.weights,
                                 drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate,
                                 channels_last=cfg.model.channels_last)
    # data.image_size: train, evaluate and save (predict/export) at that size, the rest as pretrained
    pre = model.preprocessing = dataclasses.replace(pre, input_size=cfg.data.image_size or pre.input_size)
    model.to(acc.device)
    if cfg.model.compile:  # in place: parameter names / state_dict keys stay as they are
        model.compile()
    layer_of, num_layers = layer_ids(model, cfg.model.backbone)
    phases = build_phases_for(cfg, num_layers)
    optimizer, groups, param_names = build_optimizer(model, layer_of, num_layers, cfg.optim, cfg.finetune)
    # L2-SP pulls toward the weights as built (pretrained), before any checkpoint is restored
    l2_sp = StartingPointDecay(optimizer, groups, head_layer_id=num_layers - 1,
                               strength=cfg.finetune.l2_sp) if cfg.finetune.l2_sp else None
    optimizer = acc.prepare_optimizer(optimizer)
    batch_augment = build_batch_augment(cfg.data, num_classes=n_classes, label_smoothing=cfg.optim.label_smoothing,
                                        device=acc.device, normalize=model.normalize)
    multilabel = cfg.data.task == "multilabel"
    criterion = build_criterion(cfg.optim, data.dataset.meta.splits["train"].class_counts,
                                class_names=data.class_names, device=acc.device,
                                soft_targets=batch_augment is not None and batch_augment.soft_targets,
                                multilabel=multilabel, num_samples=data.dataset.num_train_samples)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    fcache = FeatureCache(seed=cfg.train.seed, rank=acc.process_index, micro_batch_size=cfg.train.micro_batch_size,
                          spill_dir=launch.out_dir / "feature_cache",
                          **feature_cache_budget(cfg.train.feature_cache_max_ram_fraction, launch.world_size)) \
        if cfg.train.feature_cache else None
    return ModelParts(model=model, pre=pre, layer_of=layer_of, num_layers=num_layers, phases=phases,
                      optimizer=optimizer, groups=groups, param_names=param_names, l2_sp=l2_sp,
                      batch_augment=batch_augment, criterion=criterion, multilabel=multilabel, ema=ema, fcache=fcache)


def build_loaders(launch: Launch, data: RunData, parts: ModelParts) -> RunLoaders:
    """The train and val loaders of this rank at the model's preprocessing
    (:func:`trainer.data.loader.build_run_loaders`; the linear probe reads the train split with its eval transform
    and common loader arguments).

    Raises:
        ConfigError: shards that do not fit the ranks and workers (names the field).
    """
    acc = launch.accelerator
    return build_run_loaders(launch.cfg, parts.pre, rank=acc.process_index, world_size=launch.world_size,
                             device_type=acc.device.type, train_shards=data.dataset.train_shards,
                             val_shards=data.dataset.val_shards, num_classes=len(data.class_names))


@dataclass(frozen=True)
class RunLogging:
    """Where the run reports: the ``tracker`` (``metrics.jsonl`` + W&B; disabled off the main process) and the
    ``reporter`` (``reports/``, kept in step with ``checkpoints/best/``)."""

    tracker: Tracker
    reporter: Reporter


def build_run_logging(launch: Launch, data: RunData, length: RunLength, progress: Progress,
                      wandb_run_id: str | None) -> RunLogging:
    """On the main process: write ``config.yaml`` (the config this folder's run trains with), open the tracker
    (a resumed run's records after its checkpoint's ``progress.step`` are redone, a restart's all of them; W&B
    continues ``wandb_run_id``) and log the run's shape and threads. Every rank gets a reporter."""
    cfg, out_dir, tracker = launch.cfg, launch.out_dir, Tracker.disabled()
    if launch.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")  # the config this folder's run trains with
        resumed = launch.plan.last is not None
        # resume: records after the checkpoint's step rewound (and those at it it lacks); restart: all of them
        resume_step = progress.step if resumed else -1 if launch.plan.action == "restart" else None
        redo = records_to_redo(progress, out_dir) if resumed else ()
        tracker = Tracker(out_dir, cfg.to_dict(), mode=cfg.logging.wandb, project=cfg.logging.project,
                          entity=cfg.logging.entity, run_name=cfg.logging.run_name or cfg.name, run_id=wandb_run_id,
                          resume_step=resume_step, redo=redo)
        log.info("world_size=%d micro_batch_size=%d grad_accum_steps=%d global_batch_size=%d "
                 "steps/epoch=%d total_steps=%d classes=%d mixed_precision=%s", launch.world_size,
                 cfg.train.micro_batch_size, launch.accum, cfg.train.global_batch_size, data.steps_epoch,
                 length.total_steps, len(data.class_names), cfg.train.mixed_precision)
        log.info("threads: %s", describe_threads(cfg.data.num_workers, WORKER_TORCH_THREADS, WORKER_NICE))
    return RunLogging(tracker=tracker, reporter=Reporter(out_dir, data.class_names, launch.accelerator, tracker))
