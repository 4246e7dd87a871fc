"""The wall-clock budget of a run: ``train.time_budget``, or under Slurm the job's end time.

A budget covers the whole command, from the process start (``started_at``, taken by the entry point before
its heavy imports) to the last report: data preparation, rate measurements, the probe, training,
evaluations and the test pass.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

from trainer.config.schema import Config, ConfigError

SLURM_MARGIN_S = 120.0
"""Seconds kept free before a Slurm job's end (requeue bookkeeping, the scheduler's kill signal lead)."""


@dataclass(frozen=True)
class Budget:
    """Seconds available and where they come from.

    Attributes:
        seconds: wall time of the whole command (> 0).
        source: ``train.time_budget`` or ``slurm job end (<time>)``.
        started_at: ``time.time()`` at the process start; the deadline is ``started_at + seconds``.
    """

    seconds: float
    source: str
    started_at: float

    @property
    def deadline(self) -> float:
        """Epoch seconds by which the whole command must have ended."""
        return self.started_at + self.seconds

    def left(self, now: float | None = None) -> float:
        """Seconds left until :attr:`deadline` (negative once past it)."""
        return self.deadline - (time.time() if now is None else now)


def slurm_end_time(env: Mapping[str, str] | None = None) -> float | None:
    """The Slurm job's end time (epoch seconds), or None outside Slurm / when unknown.

    Read from ``SLURM_JOB_END_TIME`` (Slurm >= 21.08 sets it in the job's environment), else
    ``squeue -h -j $SLURM_JOB_ID -o %e`` (an ISO time, local zone). ``UNLIMITED`` / ``N/A`` give None.
    """
    env = os.environ if env is None else env
    value = env.get("SLURM_JOB_END_TIME", "").strip()
    if value.isdigit() and int(value) > 0:
        return float(value)
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                             timeout=20, check=False).stdout.strip()
        return datetime.fromisoformat(out).timestamp() if out and out[0].isdigit() else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def resolve_budget(cfg: Config, started_at: float, env: Mapping[str, str] | None = None) -> Budget | None:
    """The run's :class:`Budget`, or None when it has none.

    ``train.time_budget`` wins; else, for ``finetune.strategy: auto`` under Slurm, the job's end time less
    :data:`SLURM_MARGIN_S`.

    Raises:
        ConfigError: ``strategy: auto`` with neither (names ``train.time_budget``), or a Slurm job that
            ends before the margin.
    """
    if cfg.train.time_budget is not None:
        return Budget(float(cfg.train.time_budget), "train.time_budget", started_at)
    if cfg.finetune.strategy != "auto":
        return None
    end = slurm_end_time(env)
    if end is None:
        raise ConfigError("train.time_budget: finetune.strategy=auto plans a run to a wall-clock budget; set one, "
                          "e.g. --train.time_budget=15m (under Slurm the job's end time is used when unset)")
    seconds = end - started_at - SLURM_MARGIN_S
    if seconds <= 0:
        raise ConfigError(f"train.time_budget: the Slurm job ends in {end - started_at:.0f} s, less than the "
                          f"{SLURM_MARGIN_S:.0f} s kept free; give the job more time (sbatch --time)")
    return Budget(seconds, f"slurm job end ({datetime.fromtimestamp(end).isoformat(timespec='seconds')})",
                  started_at)
