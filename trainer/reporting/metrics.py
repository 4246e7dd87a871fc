"""Classification metrics that are exact across ranks.

Each rank accumulates additive sums (loss sum, sample count, top-5 hits and the confusion matrix)
over the samples it saw; :meth:`EvalAccumulator.reduce` adds them over ranks with one ``all_reduce``.
Because every validation sample is read by exactly one rank (see ``trainer.data.loader.EvalLoader``), the
result equals a single-process evaluation, whatever the number of ranks or the uneven split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalResult:
    """Reduced evaluation metrics.

    Attributes:
        loss: mean cross-entropy per sample.
        top1, top5: accuracy in [0, 1] (top5 is None with fewer than 5 classes).
        per_class: accuracy (recall) of each class, NaN where the class has no sample.
        confusion: (C, C) int64, rows = true class, columns = predicted class.
        num_samples: samples evaluated over all ranks.
    """

    loss: float
    top1: float
    top5: float | None
    per_class: list[float]
    confusion: list[list[int]]
    num_samples: int

    @property
    def balanced_accuracy(self) -> float:
        """Mean per-class recall over the classes present (Brodersen et al. 2010)."""
        vals = [a for a in self.per_class if a == a]
        return sum(vals) / len(vals) if vals else float("nan")

    def as_log(self, class_names: list[str], prefix: str = "val/") -> dict:
        """Flat dict for metrics.jsonl / W&B: loss, top1, top5, balanced accuracy, per-class accuracy."""
        out = {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1,
               f"{prefix}balanced_acc": self.balanced_accuracy, f"{prefix}num_samples": self.num_samples}
        if self.top5 is not None:
            out[f"{prefix}top5"] = self.top5
        for name, acc in zip(class_names, self.per_class):
            out[f"{prefix}acc/{name}"] = acc
        return out


class EvalAccumulator:
    """Additive evaluation state on one rank.

    Args:
        num_classes: C.
        device: where the sums live (the accelerator's device, so ``all_reduce`` works with NCCL).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top5_hits = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch. logits: (B, C) float, labels: (B,) int64 in [0, C)."""
        logits = logits.float()
        self.loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.argmax(dim=1)
        idx = labels * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)
        if self.num_classes >= 5:
            top5 = logits.topk(5, dim=1).indices
            self.top5_hits += (top5 == labels[:, None]).any(dim=1).sum()

    def reduce(self, accelerator=None) -> EvalResult:
        """Sum over ranks (one all_reduce; every rank must call it) and compute the metrics."""
        packed = torch.cat([self.confusion.flatten().double(), self.loss_sum.view(1),
                            self.top5_hits.double().view(1)])
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        c = self.num_classes
        confusion = packed[: c * c].round().long().view(c, c).cpu()
        loss_sum, top5_hits = packed[c * c].item(), packed[c * c + 1].item()
        n = int(confusion.sum())
        per_class_n = confusion.sum(dim=1)
        diag = confusion.diag()
        per_class = [(diag[i] / per_class_n[i]).item() if per_class_n[i] > 0 else float("nan")
                     for i in range(c)]
        return EvalResult(
            loss=loss_sum / max(n, 1),
            top1=(diag.sum() / max(n, 1)).item(),
            top5=(top5_hits / max(n, 1)) if c >= 5 else None,
            per_class=per_class,
            confusion=confusion.tolist(),
            num_samples=n,
        )


