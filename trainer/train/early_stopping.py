"""The monitored validation metric: which evaluation is "best" (``checkpoints/best/``) and when to stop early.

After every evaluation :meth:`EarlyStopping.update` compares the monitored metric (config
``train.early_stopping.monitor``, e.g. ``val/top1``) with the best value so far. An evaluation
*improves* when it beats the best by more than ``min_delta`` (``value > best + min_delta`` in ``max``
mode, ``value < best - min_delta`` in ``min`` mode); the first evaluation always improves. On an
improvement the run writes ``checkpoints/best/`` and the wait counter resets; otherwise the counter grows, and
when it reaches ``patience`` training stops (the same rule as Keras' ``EarlyStopping`` and Lightning's
``EarlyStopping`` callback). ``checkpoints/best/`` therefore always holds the model of the best evaluation.

Every rank sees the same reduced metrics, so every rank takes the same decision without talking.
The state (best value, its step/epoch, wait counter, stopped flag) is stored in ``last.pt``
(:meth:`state_dict`); a resumed run continues counting, and a run that has stopped stays stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def resolve_mode(monitor: str, mode: str) -> str:
    """``auto`` -> ``min`` when ``loss`` is in the metric name, else ``max``; ``max``/``min`` pass through
    (the valid set is checked by ``EarlyStoppingConfig``)."""
    if mode == "auto":
        return "min" if "loss" in monitor else "max"
    return mode


@dataclass
class EarlyStopping:
    """Tracks the best value of one metric and the evaluations since it last improved.

    Args:
        monitor: metric key in the evaluation record, e.g. ``val/top1`` or ``val/loss``.
        mode: ``max`` / ``min`` / ``auto`` (see :func:`resolve_mode`).
        patience: evaluations without improvement before :attr:`should_stop` (None: never).
        min_delta: required improvement over the best value, in the metric's units (>= 0).

    The ranges are those of :class:`trainer.config.sections.train.EarlyStoppingConfig`, checked there.

    Attributes:
        best: best value so far (None before the first evaluation).
        best_step, best_epoch: optimizer step / epoch of the best evaluation.
        wait: evaluations in a row without improvement.
        stopped: True once ``wait >= patience``.
    """

    monitor: str = "val/top1"
    mode: str = "auto"
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    wait: int = 0
    stopped: bool = False

    def __post_init__(self):
        self.mode = resolve_mode(self.monitor, self.mode)

    @classmethod
    def from_config(cls, es_cfg) -> "EarlyStopping":
        """From :class:`trainer.config.sections.train.EarlyStoppingConfig`."""
        return cls(monitor=es_cfg.monitor, mode=es_cfg.mode, patience=es_cfg.patience, min_delta=es_cfg.min_delta)

    def is_improvement(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (NaN never does)."""
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, metrics: dict, *, step: int | None = None, epoch: int | None = None) -> bool:
        """Record one evaluation.

        Args:
            metrics: the evaluation record, e.g. ``{"val/top1": 0.93, "val/loss": 0.21, ...}``.
            step, epoch: where the evaluation happened (stored with the best value).

        Returns:
            True if it improved (the caller writes ``checkpoints/best/``).

        Raises:
            KeyError: the monitored metric is not in ``metrics`` (names it and the available keys).
        """
        if self.monitor not in metrics:
            raise KeyError(f"train.early_stopping.monitor: metric {self.monitor!r} is not logged by evaluation "
                           f"(available: {sorted(metrics)})")
        value = float(metrics[self.monitor])
        if self.is_improvement(value):
            self.best, self.best_step, self.best_epoch, self.wait = value, step, epoch, 0
            return True
        self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            self.stopped = True
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row did not improve."""
        return self.stopped

    def state_dict(self) -> dict:
        """Plain dict for ``last.pt``."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore counters from :meth:`state_dict`. The monitored metric and mode must match the config
        (else the stored best is meaningless and counting restarts); patience and min_delta come from the
        current config, so they can be changed on resume (a stopped run continues after raising ``patience``)."""
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            return
        self.best, self.best_step, self.best_epoch = state["best"], state["best_step"], state["best_epoch"]
        self.wait = int(state["wait"])
        self.stopped = self.patience is not None and self.wait >= self.patience

    def summary(self) -> dict:
        """W&B summary values: ``best/<metric>``, ``best/step``, ``best/epoch``."""
        return {f"best/{self.monitor.removeprefix('val/')}": self.best, "best/step": self.best_step,
                "best/epoch": self.best_epoch}


