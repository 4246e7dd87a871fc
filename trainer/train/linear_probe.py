"""Linear probe: frozen-backbone features computed once, a logistic-regression head solved to convergence.

``finetune.strategy: linear_probe`` (and the first half of ``lp_ft``) follows the transfer evaluation
of Kornblith, Shlens & Le 2019 ("Do Better ImageNet Models Transfer Better?", CVPR): the backbone is
frozen and run once, in eval mode and with the deterministic eval transform (no augmentation), over the
training and validation splits (:func:`extract_features`); then an L2-regularised multinomial
logistic regression is fitted with full-batch L-BFGS, one fit per L2 strength of a small grid, and the
strength with the best validation top-1 is kept (:func:`fit_linear_probe`). Kornblith et al. use
scikit-learn's L-BFGS logistic regression with the regulariser picked on a held-out split; here it is
``torch.optim.LBFGS`` (strong-Wolfe line search) on the same objective, in float64:

    loss(W, b) = mean_i w_{y_i} CE(W z_i + b, y_i) / mean_i w_{y_i} + lambda / 2 * ||W||_F^2

with ``z = (x - mu) / sigma`` the features standardised with the training split's statistics
(better conditioning; the regulariser then acts on comparable scales), class weights ``w`` from
``optim.class_weights`` (1 by default). Fits are warm-started from the previous, stronger
regularisation. The standardisation is folded back into the returned head, ``W' = W / sigma``,
``b' = b - W' mu``, so it is a plain ``nn.Linear`` on the raw features (``best.pt`` needs nothing new).

Under DDP every rank extracts its share of the samples; the features are gathered on every rank,
rank 0 solves, and the head is broadcast, so all replicas end identical.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch


log = logging.getLogger("trainer")

__all__ = ["ProbeResult", "extract_features", "fit_linear_probe", "probe_head"]


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
        ``(features (N, F) float32 on CPU, labels (N,) int64, skipped sample reports of this rank)``,
        N = samples over all ranks (rank order, then loader order).
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
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return x, y, skipped


@dataclass
class ProbeResult:
    """A fitted linear probe.

    Attributes:
        weight: ``(C, F)`` float32, bias: ``(C,)`` float32, on raw (unstandardised) features.
        l2: the chosen lambda. val_top1 / val_loss: of the chosen fit (loss unregularised, unweighted).
        grid: per lambda ``{"l2", "val_top1", "val_loss", "train_top1", "iters"}``.
        seconds: wall time of all fits.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    val_top1: float
    val_loss: float
    grid: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item() if len(y) else float("nan")


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                     num_classes: int, l2_grid: Iterable[float], max_iter: int = 200,
                     class_weight: torch.Tensor | None = None) -> ProbeResult:
    """Multinomial logistic regression by full-batch L-BFGS, L2 chosen on val (see the module docstring).

    Args:
        x_train: ``(N, F)`` features; y_train: ``(N,)`` labels in ``[0, num_classes)``.
        x_val, y_val: validation features / labels; the lambda with the best val top-1 wins (ties: lower
            val loss, then the stronger regularisation). Empty: the strongest lambda reaching the best
            *train* top-1 wins.
        l2_grid: lambdas > 0, tried from the largest down, each warm-started from the previous fit.
        max_iter: L-BFGS iterations per lambda.
        class_weight: optional ``(C,)`` per-class loss weights (``optim.class_weights``).

    Returns:
        :class:`ProbeResult` with the head on raw features.

    Raises:
        ValueError: empty training set, shape mismatch, labels out of range, or a lambda <= 0.
    """
    t0 = time.perf_counter()
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    if not grid or any(v <= 0 for v in grid):
        raise ValueError(f"finetune.lp_l2_grid must hold numbers > 0, got {grid}")
    if x_train.ndim != 2 or len(x_train) == 0 or len(x_train) != len(y_train):
        raise ValueError(f"linear probe: need (N, F) training features with N labels, got {tuple(x_train.shape)} "
                         f"and {tuple(y_train.shape)}")
    if int(y_train.min()) < 0 or int(y_train.max()) >= num_classes:
        raise ValueError(f"linear probe: labels outside [0, {num_classes})")
    xt, xv = x_train.double(), x_val.double().reshape(-1, x_train.shape[1])
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    zt, zv = (xt - mu) / sd, (xv - mu) / sd
    yt, yv = y_train.long(), y_val.long()
    cw = None if class_weight is None else class_weight.double()
    w = torch.zeros(num_classes, xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    results, best = [], None
    for lam in grid:
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(zt @ w.T + b, yt, weight=cw) + 0.5 * lam * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        iters = opt.state[opt._params[0]].get("n_iter", 0)
        with torch.no_grad():
            train_top1 = _top1(zt @ w.T + b, yt)
            lv = zv @ w.T + b
            val_top1 = _top1(lv, yv)
            val_loss = torch.nn.functional.cross_entropy(lv, yv).item() if len(yv) else float("nan")
        rec = {"l2": lam, "val_top1": val_top1, "val_loss": val_loss, "train_top1": train_top1, "iters": iters}
        results.append(rec)
        log.info("linear probe: l2 %.0e  train top-1 %.4f  val top-1 %.4f  val loss %.4f  (%d L-BFGS iterations)",
                 lam, train_top1, val_top1, val_loss, iters)
        key = (train_top1,) if not len(yv) else (val_top1, -val_loss)
        if best is None or key > best[0]:
            best = (key, rec, w.detach().clone(), b.detach().clone())
    _, rec, wb, bb = best
    weight = wb / sd  # fold the standardisation into the head: W' = W / sigma, b' = b - W' mu
    bias = bb - weight @ mu
    return ProbeResult(weight=weight.float(), bias=bias.float(), l2=rec["l2"], val_top1=rec["val_top1"],
                       val_loss=rec["val_loss"], grid=results, seconds=time.perf_counter() - t0)


def probe_head(model: torch.nn.Module, train_batches: Iterable[dict], val_batches: Iterable[dict], *, accelerator,
               finetune_cfg, class_weight: torch.Tensor | None = None, tracker=None) -> int:
    """Extract features, fit the probe on rank 0 and write the head into ``model.head`` on every rank.

    Args:
        model: the plain classifier; its ``head`` (``nn.Linear(F, C)``) is overwritten.
        train_batches, val_batches: eval-transform loaders of the training and validation splits.
        finetune_cfg: ``lp_l2_grid`` and ``lp_max_iter`` of :class:`trainer.config.sections.finetune.FinetuneConfig`.
        class_weight: ``(C,)`` loss weights (``optim.class_weights``) or None.
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
        res = fit_linear_probe(xt, yt, xv, yv, num_classes=head.out_features, l2_grid=finetune_cfg.lp_l2_grid,
                               max_iter=finetune_cfg.lp_max_iter,
                               class_weight=None if class_weight is None else class_weight.cpu())
        with torch.no_grad():
            head.weight.copy_(res.weight.to(head.weight.device))
            head.bias.copy_(res.bias.to(head.bias.device))
        log.info("linear probe: %d train / %d val features in %.1f s, fit in %.1f s, l2 %.0e, val top-1 %.4f",
                 len(yt), len(yv), t_feat, res.seconds, res.l2, res.val_top1)
        if tracker is not None:
            tracker.log({"lp/l2": res.l2, "lp/val_top1": res.val_top1, "lp/val_loss": res.val_loss,
                         "lp/feature_seconds": t_feat, "lp/fit_seconds": res.seconds}, step=0)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        with torch.no_grad():
            for t in (head.weight, head.bias):
                t.copy_(broadcast(t.detach().clone(), from_process=0))
    return len(skipped)
