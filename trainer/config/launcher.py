"""Config values that a launcher may set instead: ``accelerate launch --mixed_precision bf16`` (or an
``accelerate config`` default) reaches every process as ``ACCELERATE_MIXED_PRECISION``.

``train.mixed_precision: auto`` (the default) takes the launcher's value, else ``no``; a value set in the
YAML or on the command line wins, and when the two differ the run says so in one line. The number of
processes (``WORLD_SIZE``) and CPU mode (``ACCELERATE_USE_CPU``) have no config field: the launcher's
values always apply (``trainer.dist.accelerator.make_accelerator``).
"""

from __future__ import annotations

import os

from trainer.config.fields import ConfigError

MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
_PRECISIONS = ("no", "bf16", "fp16")


def resolve_mixed_precision(configured: str, env: dict | None = None) -> tuple[str, str | None]:
    """``(value to use, note or None)`` for ``train.mixed_precision`` = ``configured``.

    ``auto`` -> the launcher's ``ACCELERATE_MIXED_PRECISION`` if set, else ``no``; any other value wins
    over the launcher. The note (one line to show) says where a launcher's value went; None without one.

    Raises:
        ConfigError: the launcher's value is not one of no/bf16/fp16 (names the variable).
    """
    env = os.environ if env is None else env
    launcher = env.get(MIXED_PRECISION_ENV, "").strip().lower() or None
    if launcher is not None and launcher not in _PRECISIONS:
        raise ConfigError(f"{MIXED_PRECISION_ENV}={launcher!r} (set by accelerate launch --mixed_precision or "
                          f"accelerate config) is not allowed (allowed: {', '.join(_PRECISIONS)})")
    if configured == "auto":
        if launcher is None:
            return "no", None
        return launcher, f"train.mixed_precision=auto -> {launcher} from the launcher ({MIXED_PRECISION_ENV}={launcher})"
    if launcher is not None and launcher != configured:
        return configured, (f"train.mixed_precision={configured} from the config wins over the launcher's "
                            f"{MIXED_PRECISION_ENV}={launcher}")
    return configured, None
