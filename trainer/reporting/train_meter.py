"""The training record logged every ``train.log_every_steps``: mean loss since the previous record, images/s.

The loss of each optimizer step stays on the device and is summed there; the ranks' means are all-reduced
only when a record is made (the only synchronisation the loop has between evaluations).
"""

from __future__ import annotations

import time

import torch


class TrainMeter:
    """Mean training loss and throughput between records (the first window starts when the meter is made).

    Args:
        accelerator: the run's Accelerator (device, all-reduce). samples_seen: the run's counter at the start.
    """

    def __init__(self, accelerator, samples_seen: int):
        self.accelerator = accelerator
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.count = 0
        self.t0, self.s0 = time.perf_counter(), samples_seen

    def add(self, loss: torch.Tensor) -> None:
        """One optimizer step's loss (a 0-dim tensor on the device, not synchronised)."""
        self.loss_sum += loss
        self.count += 1

    def record(self, *, epoch: int, samples_seen: int, lrs: dict[str, float]) -> dict:
        """The record ``{epoch, samples_seen, train/loss (mean over ranks and steps since the previous record),
        train/images_per_s (global, over the window since the previous record), lr/<group>}``; resets the
        loss mean and the window. Every rank calls it."""
        loss = self.accelerator.reduce(self.loss_sum / max(self.count, 1), reduction="mean").item()
        dt = time.perf_counter() - self.t0
        ips = (samples_seen - self.s0) / dt if dt > 0 else float("nan")
        self.loss_sum.zero_()
        self.count = 0
        self.t0, self.s0 = time.perf_counter(), samples_seen
        return {"epoch": epoch, "samples_seen": samples_seen, "train/loss": loss, "train/images_per_s": ips,
                **{f"lr/{k}": v for k, v in lrs.items()}}
