"""The ``finetune.strategy: linear_probe`` wiring (and the first half of ``lp_ft``): frozen-backbone
features computed once, the head solved by :func:`trainer.finetune.linear_probe.fit_linear_probe`.

The backbone is run once, in eval mode and with the deterministic eval transform (no augmentation), over
the training and validation splits (:func:`extract_features`); the solver (L-BFGS logistic regression,
L2 chosen on val from ``finetune.lp_l2_grid``, Kornblith et al. 2019) returns a plain ``nn.Linear`` head on
raw features, written into ``model.head`` (:func:`probe_head`), so ``best.pt`` needs nothing new.

Under DDP every rank extracts its share of the samples; the features are gathered on every rank,
rank 0 solves, and the head is broadcast, so all replicas end identical.

Multi-label data (the loader's labels are ``(B, C)`` label sets, ``data.task: multilabel``): the head is
solved by :func:`trainer.finetune.linear_probe.fit_linear_probe_multilabel` (sigmoid cross-entropy with the
loss's ``pos_weight``), the L2 chosen by the validation macro mAP
(:func:`trainer.reporting.multilabel.mean_average_precision`).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import torch

from trainer.finetune.linear_probe import fit_linear_probe, fit_linear_probe_multilabel
from trainer.reporting.multilabel import mean_average_precision

log = logging.getLogger("trainer")

__all__ = ["extract_features", "probe_for_run", "probe_head"]


@torch.no_grad()  # not inference_mode: the features feed the L-BFGS autograd graph
def extract_features(model: torch.nn.Module, batches: Iterable[dict], *,
                     accelerator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Backbone features of every batch on this rank, gathered over all ranks.

    Args:
        model: the plain :class:`trainer.models.classifier.ImageClassifier` (put in eval mode here; it
            normalises the uint8 images itself).
        batches: loader batches (``image`` (B, 3, S, S) uint8, ``label`` (B,), ``skipped``), e.g. an
            :class:`trainer.data.loader.EvalLoader` with the eval transform.

    Returns:
        ``(features (N, F) float32 on CPU, labels (N,) int64 (multi-label: (N, C) float), skipped sample reports
        of this rank)``, N = samples over all ranks (rank order, then loader order).
    """
    was_training = model.training
    model.eval()
    feats, labels, skipped = [], [], []
    for batch in batches:
        skipped += batch.get("skipped") or []
        images = batch["image"].to(accelerator.device, non_blocking=True)
        y = batch["label"]
        with accelerator.autocast():
            f = model.forward_features(model.normalize(images))
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    width = model.num_features
    x = torch.cat(feats) if feats else torch.zeros(0, width)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        parts = gather_object([(x, y)])
        parts = [p for p in parts if len(p[1])] or parts[:1]  # a rank without samples has no label shape
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return x, y, skipped


def probe_head(model: torch.nn.Module, train_batches: Iterable[dict], val_batches: Iterable[dict], *, accelerator,
               finetune_cfg, class_weight: torch.Tensor | None = None, tracker=None) -> int:
    """Extract features, fit the probe on rank 0 and write the head into ``model.head`` on every rank.

    Args:
        model: the plain classifier; its ``head`` (``nn.Linear(F, C)``) is overwritten.
        train_batches, val_batches: eval-transform loaders of the training and validation splits.
        finetune_cfg: ``lp_l2_grid`` and ``lp_max_iter`` of :class:`trainer.config.sections.finetune.FinetuneConfig`.
        class_weight: ``(C,)`` loss weights (``optim.class_weights``; multi-label: ``optim.pos_weight``) or None.
        tracker: optional :class:`trainer.reporting.tracking.Tracker` for the ``lp/*`` figures (step 0).

    Returns:
        the number of bad training samples this rank skipped while extracting.
    """
    t0 = time.perf_counter()
    xt, yt, skipped = extract_features(model, train_batches, accelerator=accelerator)
    xv, yv, _ = extract_features(model, val_batches, accelerator=accelerator)
    t_feat = time.perf_counter() - t0
    head = model.head
    if accelerator.is_main_process:
        cw = None if class_weight is None else class_weight.cpu()
        if yt.ndim == 2:  # label sets: BCE probe, L2 chosen by val mAP
            c = head.out_features
            yv = yv.reshape(-1, c) if len(yv) else torch.zeros(0, c)
            res = fit_linear_probe_multilabel(xt, yt.float(), xv, yv.float(), l2_grid=finetune_cfg.lp_l2_grid,
                                              max_iter=finetune_cfg.lp_max_iter, score=mean_average_precision,
                                              pos_weight=cw)
            label, key, val = "mAP", "map", res.val_map
        else:
            res = fit_linear_probe(xt, yt, xv, yv, num_classes=head.out_features, l2_grid=finetune_cfg.lp_l2_grid,
                                   max_iter=finetune_cfg.lp_max_iter, class_weight=cw)
            label, key, val = "top-1", "top1", res.val_top1
        with torch.no_grad():
            head.weight.copy_(res.weight.to(head.weight.device))
            head.bias.copy_(res.bias.to(head.bias.device))
        for r in res.grid:
            log.info("linear probe: l2 %.0e  train %s %.4f  val %s %.4f  val loss %.4f  (%d L-BFGS iterations)",
                     r["l2"], label, r[f"train_{key}"], label, r[f"val_{key}"], r["val_loss"], r["iters"])
        log.info("linear probe: %d train / %d val features in %.1f s, fit in %.1f s, l2 %.0e, val %s %.4f",
                 len(yt), len(yv), t_feat, res.seconds, res.l2, label, val)
        if tracker is not None:
            tracker.log({"lp/l2": res.l2, f"lp/val_{'mAP' if key == 'map' else key}": val,
                         "lp/val_loss": res.val_loss, "lp/feature_seconds": t_feat, "lp/fit_seconds": res.seconds},
                        step=0)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        with torch.no_grad():
            for t in (head.weight, head.bias):
                t.copy_(broadcast(t.detach().clone(), from_process=0))
    return len(skipped)


def probe_for_run(model: torch.nn.Module, *, train_shards, val_loader: Iterable[dict], transform, loader_kwargs: dict,
                  micro_batch_size: int, criterion: torch.nn.Module, accelerator, finetune_cfg, tracker=None,
                  ema=None, num_train: int | None = None) -> int:
    """``finetune.strategy`` linear_probe / lp_ft in a run: :func:`probe_head` on the training split read with
    the eval transform, the loss's class weights, then the head copied into the EMA (if any). Every rank calls it.

    Args:
        model: the plain classifier. train_shards: the training split's shards. val_loader: the run's eval loader.
        transform: the eval transform. loader_kwargs: the run's loader arguments (rank, world_size, workers, ...).
        criterion: the training loss (its ``weight`` when it is a ``CrossEntropyLoss``; multi-label: its
            ``pos_weight``).
        ema: the run's :class:`trainer.train.ema.ModelEma` or None.
        num_train: the training split's size; with ``finetune.lp_max_samples`` below it, every k-th sample of
            each training shard is read (k = ceil(num_train / lp_max_samples); the shards hold the listing's
            order, so every class keeps its share) and the others are skipped before decoding.

    Returns:
        bad training samples skipped while extracting (this rank).
    """
    from trainer.data.loader import EvalLoader

    cap = finetune_cfg.lp_max_samples
    stride = -(-num_train // cap) if cap and num_train and num_train > cap else 1
    train_eval = EvalLoader(train_shards, transform=transform, micro_batch_size=micro_batch_size, stride=stride,
                            **loader_kwargs)
    weight = criterion.weight if isinstance(criterion, torch.nn.CrossEntropyLoss) else \
        getattr(criterion, "pos_weight", None)  # multi-label (SoftTargetCrossEntropy has none)
    skipped = probe_head(model, train_eval, val_loader, accelerator=accelerator, finetune_cfg=finetune_cfg,
                         class_weight=weight, tracker=tracker)
    if ema is not None:
        ema.reset_to(model)
    return skipped
