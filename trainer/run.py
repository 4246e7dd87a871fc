"""One training run: wires config, data, model, freezing, optimizer, loop, checkpoints and tracking.

Order of events (every rank runs the same code; only the main process writes files or logs):

1. Build the Accelerator (DDP over gloo on CPU, NCCL on GPU) and check the world size.
2. Make sure the shards exist (the main process writes them from ``data.root`` if needed) and read
   the class map + sample counts from ``dataset.json``.
3. Build the model with the backbone's own preprocessing, layer ids, named param groups, and the
   unfreeze timetable; one optimizer holds every parameter for the whole run (frozen ones simply have
   no gradient), so optimizer state survives phase changes and resumes.
4. Resume from ``last.pt`` if present. Then epochs: at a phase change ``freezing.apply_phase`` sets
   ``requires_grad`` and the model is re-wrapped in DDP; each optimizer step sets every group's lr from
   the pure schedule; ranks agree on preemption every ``train.preempt_check_every_steps`` steps;
   ``last.pt`` is written at epoch ends, at the configured interval and on preemption; ``best.pt`` when the monitored metric improves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from trainer import checkpoint as ckpt_lib
from trainer.config import Config, ConfigError, config_from_dict, grad_accum_steps, save_config
from trainer.data import EvalLoader, TrainLoader, steps_per_epoch
from trainer.dataset import prepare_dataset
from trainer.distributed import make_accelerator, unwrap, wrap_ddp
from trainer.early_stopping import EarlyStopping
from trainer.feature_cache import FeatureCache
from trainer.freezing import apply_phase
from trainer.loop import evaluate, train_step
from trainer.losses import build_criterion
from trainer.model import build_model, layer_ids
from trainer.optim import build_optimizer, set_lrs
from trainer.schedule import build_phases, phase_index_at
from trainer.reports import Reporter
from trainer.signals import PreemptionHandler
from trainer.tracking import Tracker
from trainer.transforms import build_transforms

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


def build_phases_for(cfg: Config, num_layers: int):
    """The unfreeze timetable of ``cfg`` (``finetune`` section) for a model with ``num_layers`` layer ids."""
    f = cfg.finetune
    return build_phases(freeze=f.freeze, phases=f.phases, gradual_every=f.gradual_every,
                        gradual_start_epoch=f.gradual_start_epoch, num_backbone_layers=num_layers - 1,
                        epochs=cfg.train.epochs, unfreeze_warmup_steps=f.unfreeze_warmup_steps,
                        unfrozen_lr_scale=f.unfrozen_lr_scale)


def run(cfg: Config) -> RunResult:
    """Train (or resume) the run described by ``cfg``. See the module docstring for the sequence.

    Raises:
        ConfigError: config fields that do not fit the data or the launch (names the field).
        trainer.checkpoint.CheckpointError: a checkpoint that does not fit this run (names the file).
    """
    accelerator = make_accelerator(cfg.train.mixed_precision, timeout_s=cfg.train.dist_timeout_s)
    is_main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank {accelerator.process_index}] %(levelname)s %(message)s")
    world_size = accelerator.num_processes
    accum = grad_accum_steps(cfg, world_size)
    out_dir = Path(cfg.train.output_dir)
    set_seed(cfg.train.seed)

    # ---- data -------------------------------------------------------------------------------
    ds = prepare_dataset(cfg.data, accelerator)
    class_names = ds.meta.classes
    num_classes = len(class_names)
    n_train = ds.num_train_samples
    steps_epoch = steps_per_epoch(n_train, cfg.train.global_batch_size)
    # the lr schedule always spans the configured epochs; max_steps only stops the run early, so a
    # run stopped by max_steps and resumed follows the same lrs as an uninterrupted one
    schedule_steps = total_steps = steps_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    if cfg.optim.warmup_steps > schedule_steps:
        raise ConfigError(f"optim.warmup_steps ({cfg.optim.warmup_steps}) is longer than the whole run "
                          f"({schedule_steps} steps = train.epochs x {steps_epoch} steps per epoch)")

    # ---- model ------------------------------------------------------------------------------
    if cfg.model.weights in ("default", "imagenet"):
        # library weights: local rank 0 of each node fetches + verifies the cached file (fast failure
        # offline, naming the file); the others wait, then find it in the cache (trainer/weights.py)
        from trainer.weights import ensure_weights
        ensure_weights(cfg.model.backbone, local_rank=accelerator.local_process_index,
                       barrier=accelerator.wait_for_everyone)
    with accelerator.local_main_process_first():
        model, pre = build_model(cfg.model.backbone, num_classes, cfg.model.weights,
                                 drop_rate=cfg.model.drop_rate)
    model.to(accelerator.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:  # in place: parameter names / state_dict keys stay as they are
        model.compile()
    fcache = FeatureCache(seed=cfg.train.seed, rank=accelerator.process_index,
                          micro_batch_size=cfg.train.micro_batch_size) if cfg.train.feature_cache else None
    layer_of, num_layers = layer_ids(model, cfg.model.backbone)
    phases = build_phases_for(cfg, num_layers)
    optimizer, groups, names = build_optimizer(model, layer_of, num_layers, cfg.optim, cfg.finetune)
    optimizer = accelerator.prepare_optimizer(optimizer)
    criterion = build_criterion(cfg.optim, ds.meta.splits["train"].class_counts, class_names=class_names,
                                device=accelerator.device)

    train_tf = build_transforms(pre.input_size, train=True, crop_pct=pre.crop_pct,
                                interpolation=pre.interpolation, augment=cfg.data.augment)
    eval_tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct,
                               interpolation=pre.interpolation)
    pin = cfg.data.pin_memory and accelerator.device.type == "cuda"
    train_loader = TrainLoader(ds.train_shards, rank=accelerator.process_index, world_size=world_size,
                               micro_batch_size=cfg.train.micro_batch_size, num_workers=cfg.data.num_workers,
                               transform=train_tf, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                               bad_samples=cfg.data.bad_samples, resampled=cfg.data.resampled,
                               pin_memory=pin, num_classes=num_classes)
    eval_bs = cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
    eval_loader = EvalLoader(ds.val_shards, rank=accelerator.process_index, world_size=world_size,
                             micro_batch_size=eval_bs, num_workers=cfg.data.num_workers, transform=eval_tf,
                             bad_samples=cfg.data.bad_samples, pin_memory=pin, num_classes=num_classes)

    # ---- state / resume --------------------------------------------------------------------
    step, epoch, samples_seen = 0, 0, 0
    best_top1, wandb_id, history_best = -1.0, None, {}
    stopper = EarlyStopping.from_config(cfg.train.early_stopping)  # monitored metric: best.pt, early stop
    last_path = ckpt_lib.latest_checkpoint(out_dir) if cfg.train.resume else None
    if last_path is not None:
        state = ckpt_lib.load(last_path)
        if state["class_names"] != class_names:
            raise ConfigError(
                f"checkpoint {last_path} was trained on {len(state['class_names'])} classes "
                f"{state['class_names'][:5]}... but the data has {num_classes} classes "
                f"{class_names[:5]}... (data.shard_dir / train.output_dir)")
        if state["backbone"] != cfg.model.backbone:
            raise ConfigError(f"checkpoint {last_path} has backbone {state['backbone']}, config "
                              f"model.backbone is {cfg.model.backbone}")
        unwrap(model).load_state_dict(state["model"])
        ckpt_lib.load_optimizer_state_by_name(optimizer.optimizer, state["optimizer"], names,
                                              source=str(last_path))
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, samples_seen = state["step"], state["epoch"], state["samples_seen"]
        best_top1, wandb_id = state["best_top1"], state.get("wandb_run_id")
        if state.get("early_stopping"):
            stopper.load_state_dict(state["early_stopping"])
        saved_gbs = (state.get("config") or {}).get("train", {}).get("global_batch_size")
        if saved_gbs is not None and saved_gbs != cfg.train.global_batch_size:
            raise ConfigError(
                f"checkpoint {last_path} was trained with train.global_batch_size={saved_gbs}, this run has "
                f"{cfg.train.global_batch_size}: steps, epochs and the lr schedule would not line up "
                "(keep train.global_batch_size; a different world size is fine)")
        rng = state.get("rng") or []
        if len(rng) == world_size:
            ckpt_lib.set_rng_state(rng[accelerator.process_index])
        else:  # another world size: per-rank RNG streams do not map; seeds stay as set above
            log.warning("resuming on %d processes from a checkpoint of %d: per-rank RNG states not restored, "
                        "data order and augmentation differ from an uninterrupted run", world_size, len(rng))
        log.info("resumed from %s at epoch %d step %d (samples_seen %d)", last_path, epoch, step, samples_seen)

    tracker = Tracker.disabled()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        tracker = Tracker(out_dir, cfg.to_dict(), mode=cfg.logging.wandb, project=cfg.logging.project,
                          entity=cfg.logging.entity, run_name=cfg.logging.run_name or cfg.name,
                          run_id=wandb_id, resume_step=step if last_path is not None else None)
        log.info("world_size=%d micro_batch_size=%d grad_accum_steps=%d global_batch_size=%d "
                 "steps/epoch=%d total_steps=%d classes=%d", world_size, cfg.train.micro_batch_size,
                 accum, cfg.train.global_batch_size, steps_epoch, total_steps, num_classes)

    handler = PreemptionHandler()
    handler.install()

    def save_last(reason: str) -> None:
        rng_all = accelerator.gather_for_metrics([ckpt_lib.rng_state()], use_gather_object=True) \
            if world_size > 1 else [ckpt_lib.rng_state()]
        if is_main:
            state = {
                "format_version": ckpt_lib.FORMAT_VERSION, "kind": "resume",
                "model": unwrap(model).state_dict(),
                "optimizer": ckpt_lib.optimizer_state_by_name(optimizer.optimizer, names),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rng_all, "step": step, "epoch": epoch, "samples_seen": samples_seen,
                "phase_index": phase_index_at(phases, min(epoch, cfg.train.epochs - 1)),
                "class_names": class_names, "backbone": cfg.model.backbone,
                "preprocessing": pre.to_dict(), "config": cfg.to_dict(), "best_top1": best_top1,
                "early_stopping": stopper.state_dict(),
                "wandb_run_id": tracker.run_id, "world_size": world_size, "reason": reason,
            }
            ckpt_lib.atomic_save(state, ckpt_lib.checkpoint_dir(out_dir) / "last.pt")
            log.info("saved last.pt at step %d (%s)", step, reason)
        accelerator.wait_for_everyone()

    # ---- epochs -----------------------------------------------------------------------------
    ddp_model, current_phase = None, None
    last_eval: dict = {}
    preempted = False
    last_ckpt_time = time.monotonic()
    mean, std = pre.mean, pre.std
    progress = None
    if is_main and cfg.logging.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    try:
        reporter = Reporter(out_dir, class_names, accelerator, tracker)
        if stopper.should_stop:
            log.info("early stopping: stopped before (%s did not improve for %d evaluations); nothing to do",
                     stopper.monitor, stopper.wait)
        while epoch < cfg.train.epochs and step < total_steps and not stopper.should_stop:
            pidx = phase_index_at(phases, epoch)
            if pidx != current_phase:
                summary = apply_phase(unwrap(model), layer_of, num_layers, phases[pidx],
                                      frozen_bn=cfg.finetune.frozen_bn, bn_stats=cfg.finetune.bn_stats)
                ddp_model = wrap_ddp(unwrap(model), accelerator)
                current_phase = pidx
                log.info("epoch %d: phase %d %s: %s", epoch, pidx, phases[pidx], summary)
            ddp_model.train()
            epoch_start_step = epoch * steps_epoch
            done_in_epoch = step - epoch_start_step
            batches = train_loader.epoch(epoch, steps_epoch * accum)
            if fcache is not None:  # frozen backbone: record features in the first epoch, then reuse them
                batches = fcache.train_batches(unwrap(model), batches, epoch=epoch, num_batches=steps_epoch * accum,
                                               start_batch=done_in_epoch * accum)
            for _ in range(done_in_epoch * accum):  # resume mid-epoch: replay the same stream
                next(batches)
            skipped: list[str] = []

            def counted(it):
                for b in it:
                    skipped.extend(b.get("skipped") or [])
                    yield b
            stream = counted(batches)
            loss_acc = torch.zeros((), device=accelerator.device)
            loss_n = 0
            t0, s0 = time.perf_counter(), samples_seen
            while step < epoch_start_step + steps_epoch and step < total_steps:
                lrs = set_lrs(optimizer, groups, step=step, total_steps=schedule_steps, phases=phases,
                              steps_per_epoch=steps_epoch, optim_cfg=cfg.optim,
                              head_layer_id=num_layers - 1)
                loss_acc += train_step(ddp_model, stream, optimizer=optimizer, criterion=criterion,
                                       accelerator=accelerator, grad_accum_steps=accum, mean=mean, std=std,
                                       channels_last=cfg.model.channels_last, grad_clip=cfg.optim.grad_clip)
                loss_n += 1
                step += 1
                samples_seen += cfg.train.global_batch_size
                if progress is not None:
                    progress.update(1)
                if step % cfg.train.log_every_steps == 0 or step == epoch_start_step + steps_epoch:
                    loss = accelerator.reduce(loss_acc / loss_n, reduction="mean").item()
                    dt = time.perf_counter() - t0
                    ips = (samples_seen - s0) / dt if dt > 0 else float("nan")
                    rec = {"epoch": epoch, "samples_seen": samples_seen, "train/loss": loss,
                           "train/images_per_s": ips}
                    rec.update({f"lr/{k}": v for k, v in lrs.items()})
                    tracker.log(rec, step=step)
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss:.3f}", ips=f"{ips:.1f}")
                    loss_acc.zero_()
                    loss_n = 0
                check_now = step % cfg.train.preempt_check_every_steps == 0  # same steps on every rank
                if check_now and handler.should_stop(accelerator):
                    preempted = True
                    break
                interval_steps = cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0
                interval_time = cfg.train.checkpoint_every_minutes and \
                    time.monotonic() - last_ckpt_time > 60 * cfg.train.checkpoint_every_minutes
                if cfg.train.checkpoint_every_minutes and world_size > 1:  # a collective: all ranks or none
                    flag = torch.tensor(1.0 if interval_time else 0.0, device=accelerator.device)
                    interval_time = check_now and accelerator.reduce(flag, reduction="sum").item() > 0
                if interval_steps or interval_time:
                    save_last("interval")
                    last_ckpt_time = time.monotonic()
            n_skipped = accelerator.reduce(torch.tensor(float(len(skipped)), device=accelerator.device),
                                           reduction="sum").item() if world_size > 1 else len(skipped)
            for s in skipped:
                log.warning("skipped bad sample %s", s)
            if preempted:
                save_last(f"preempted (signal {handler.agreed_signal})")
                break
            # ---- end of epoch: evaluate, checkpoint -----------------------------------------
            collector = reporter.collector()
            val_batches = iter(eval_loader) if fcache is None else fcache.eval_batches(unwrap(model), eval_loader)
            res = evaluate(unwrap(model), val_batches, num_classes=num_classes, accelerator=accelerator,
                           mean=mean, std=std, channels_last=cfg.model.channels_last, on_batch=collector)
            last_eval = res.as_log(class_names)
            last_eval["val/confusion"] = res.confusion
            epoch_done = step >= epoch_start_step + steps_epoch
            if epoch_done:
                epoch += 1
            rec = {"epoch": epoch, "samples_seen": samples_seen, "data/skipped": n_skipped, **last_eval}
            if world_size > 1:
                rec["ddp/replica_max_abs_diff"] = check_replicas(unwrap(model), accelerator)
            tracker.log(rec, step=step)
            if is_main:
                log.info("epoch %d step %d: val/loss %.4f val/top1 %.4f", epoch, step, res.loss, res.top1)
            improved = stopper.update(last_eval, step=step, epoch=epoch)
            if improved:  # best.pt follows train.early_stopping.monitor; best_top1 is top-1 of that model
                best_top1 = res.top1
                if is_main:
                    payload = ckpt_lib.inference_payload(
                        unwrap(model).state_dict(), class_names=class_names, backbone=cfg.model.backbone,
                        preprocessing=pre.to_dict(), config=cfg.to_dict(),
                        metrics={"epoch": epoch, "step": step, **{k: v for k, v in last_eval.items()
                                                                  if k != "val/confusion"}})
                    ckpt_lib.atomic_save(payload, ckpt_lib.checkpoint_dir(out_dir) / "best.pt")
                tracker.summary({"best/val_top1": best_top1, "best/epoch": epoch, **stopper.summary()})
            reporter.after_eval(res, collector, improved=improved, step=step, epoch=epoch)
            save_last("epoch")
            if stopper.should_stop:
                log.info("early stopping at epoch %d step %d: %s did not improve by more than %g for %d "
                         "evaluations (best %.4f at epoch %s)", epoch, step, stopper.monitor, stopper.min_delta,
                         stopper.wait, stopper.best, stopper.best_epoch)
            last_ckpt_time = time.monotonic()
        reporter.finish(step)
    finally:
        handler.restore()
        if progress is not None:
            progress.close()
        tracker.close()
    accelerator.wait_for_everyone()
    return RunResult(output_dir=out_dir, best_top1=best_top1, last_eval=last_eval, step=step, epoch=epoch,
                     preempted=preempted, early_stopped=stopper.should_stop)


def check_replicas(model: torch.nn.Module, accelerator) -> float:
    """Largest difference between ranks of any parameter's fingerprint (sum and sum of squares).

    DDP keeps replicas identical by construction; this is the run-time proof (0.0 expected). A
    non-zero value means ranks trained different models (e.g. a phase change DDP did not see), and
    the run stops with an error rather than silently saving rank 0's copy.

    Raises:
        RuntimeError: the replicas differ by more than 1e-6.
    """
    with torch.no_grad():
        fp = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                          for p in model.parameters()]).flatten()
    allfp = accelerator.gather(fp.to(accelerator.device)).view(accelerator.num_processes, -1)
    diff = (allfp - allfp[0]).abs().max().item()
    if diff > 1e-6:
        raise RuntimeError(f"DDP replicas differ across ranks (max fingerprint difference {diff:g})")
    return diff


def load_run_config(output_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    import yaml
    return config_from_dict(yaml.safe_load((Path(output_dir) / "config.yaml").read_text()))
