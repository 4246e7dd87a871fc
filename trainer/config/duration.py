"""Durations as users write them: ``20m``, ``2h``, ``1h30m``, ``90s``, ``1.5h`` or a number of seconds.

:func:`parse_duration` is the one reader of ``train.time_budget`` (and of the planner's Slurm time limits).
Imports nothing from ``trainer`` but :mod:`trainer.config.fields`.
"""

from __future__ import annotations

import math
import re

from trainer.config.fields import ConfigError

UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
"""Unit -> seconds. A number without a unit is seconds."""
MAX_SECONDS = 30 * 86400.0
"""The longest budget accepted (30 days): beyond it a value is a typo (ms meant as s, say)."""
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)?\s*")


def parse_duration(value, field: str) -> float:
    """Seconds in ``value``.

    Args:
        value: a number (seconds) or text: one or more ``<number><unit>`` parts (``1h30m``), units
            :data:`UNITS`; a bare number is seconds.
        field: the config field named in errors.

    Returns:
        seconds, a float in (0, :data:`MAX_SECONDS`].

    Raises:
        ConfigError: not a duration, a unit that does not exist, 0, negative, or over 30 days (names ``field``).
    """
    allowed = "(allowed: a duration > 0 such as 20m, 2h, 1h30m, 90s or a number of seconds, up to 30 days)"
    if isinstance(value, bool):
        raise ConfigError(f"{field}: {value!r} is not allowed {allowed}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        seconds, pos, parts = 0.0, 0, 0
        while pos < len(text):
            m = _PART.match(text, pos)
            if not m or m.end() == pos:
                raise ConfigError(f"{field}: {value!r} is not allowed {allowed}")
            unit = m.group(2)
            if unit is None and (parts or m.end() < len(text)):  # a bare number only on its own: seconds
                raise ConfigError(f"{field}: {value!r} is not allowed {allowed}")
            if unit is not None and unit not in UNITS:
                raise ConfigError(f"{field}: {value!r} has unit {unit!r}, which does not exist (units: "
                                  f"{', '.join(UNITS)}; no unit: seconds)")
            seconds += float(m.group(1)) * UNITS[unit or "s"]
            pos, parts = m.end(), parts + 1
        if not parts:
            raise ConfigError(f"{field}: {value!r} is not allowed {allowed}")
    else:
        raise ConfigError(f"{field}: {value!r} is not allowed {allowed}")
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise ConfigError(f"{field}: {value!r} is not allowed {allowed}")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as ``1h05m``, ``12m30s`` or ``45s`` (for plan tables and messages)."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s" if sec else f"{m}m"
    return f"{sec}s"
