"""The run resolved once: what a config leaves to the launcher and the machine, decided at start.

:func:`resolve_run` is called once per process, by the entry point (``trainer/main.py``,
``launch/select_backbone.py``) or, for a library caller that did not, by :func:`trainer.train.start.run`.
It returns a :class:`ResolvedRun` (frozen) whose ``config`` is a copy of the loaded config with every
``auto`` the launcher or hardware decides replaced by its value; every component receives that config and
nothing re-resolves or mutates it afterwards. ``config.yaml`` and the checkpoints record the resolved
values, so a resumed run compares equal to its unchanged config.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Mapping

from trainer.config.launcher import resolve_config_precision
from trainer.config.schema import Config


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """A config with its launcher and machine settings resolved.

    Attributes:
        config: the config the run trains with: ``train.mixed_precision`` is ``no``, ``bf16`` or ``fp16``,
            never ``auto`` (the rule: :mod:`trainer.config.launcher`).
        notes: lines to show once (which launcher setting applies or is overridden).
    """

    config: Config
    notes: tuple[str, ...]
    started_at: float = dataclasses.field(default_factory=time.time)
    """``time.time()`` when the process started (the entry point's first line): a ``train.time_budget``
    counts from it."""


def resolve_run(cfg: Config, env: Mapping[str, str] | None = None, started_at: float | None = None) -> ResolvedRun:
    """Resolve ``cfg``'s launcher and hardware settings once (see the module docstring).

    Args:
        cfg: the loaded, checked config (not modified).
        env: environment (default ``os.environ``): ``ACCELERATE_MIXED_PRECISION``.
        started_at: the process start (default: now).

    Returns:
        The :class:`ResolvedRun`; its ``config`` is a new object.

    Raises:
        ConfigError: a launcher variable with a value that is not allowed (names the variable).
    """
    env = os.environ if env is None else env
    value, note = resolve_config_precision(cfg, dict(env))
    config = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=value))
    return ResolvedRun(config=config, notes=(note,) if note else (),
                       started_at=time.time() if started_at is None else started_at)
