"""How a config field declares and checks its valid values: the pattern every section follows.

A field is a dataclass field whose valid range lives in its metadata, next to its default::

    @dataclass
    class OptimConfig(Section):
        _where: ClassVar[str] = "optim"              # the section's name in messages
        lr: float = num(1e-3, gt=0)                  # number in (0, inf)
        \"\"\"Peak learning rate of the head.\"\"\"
        grad_clip: Optional[float] = num(None, gt=0)  # None or > 0
        \"\"\"Clip the global gradient norm to this value (None: no clipping).\"\"\"
        name: Literal["adamw", "sgd"] = "adamw"      # a set: the Literal is the valid set

        def _check(self):                            # checks that need several fields
            ...

:class:`Section.__post_init__` converts every field by its type annotation (:func:`coerce`: ``"1e-3"``
-> 0.001 for a float, ``"no"`` stays ``"no"`` for a Literal, ``"off"`` -> False for a bool, a mapping ->
the nested section or :class:`~trainer.config.sections.finetune.Phase`), checks each number against its
:class:`Range` (and that it is finite), then calls ``_check`` for rules between fields. Every failure is a
:class:`ConfigError` whose message starts with the field's full name (``optim.grad_clip: -1.0 is not
allowed (allowed: > 0 or null)``). ``trainer/main.py --help`` prints the same ranges (:func:`describe`).

Imports nothing from ``trainer``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal, Union


class ConfigError(ValueError):
    """A config file, field or override is invalid. The message names the key (``section.field``) or file."""


@dataclass(frozen=True)
class Range:
    """Valid interval of a numeric field: ``ge``/``gt`` lower bound, ``le``/``lt`` upper bound (None: open)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in the interval (NaN never does)."""
        return not ((self.ge is not None and not x >= self.ge) or (self.gt is not None and not x > self.gt)
                    or (self.le is not None and not x <= self.le) or (self.lt is not None and not x < self.lt)
                    or math.isnan(x))

    def __str__(self) -> str:
        lo = f"[{_n(self.ge)}" if self.ge is not None else f"({_n(self.gt)}" if self.gt is not None else None
        hi = f"{_n(self.le)}]" if self.le is not None else f"{_n(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f">= {_n(self.ge)}" if self.ge is not None else f"> {_n(self.gt)}"
        if hi:
            return f"<= {_n(self.le)}" if self.le is not None else f"< {_n(self.lt)}"
        return "any finite number"


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def num(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None) -> Any:
    """A numeric dataclass field with its valid range, e.g. ``lr: float = num(1e-3, gt=0)``.

    ``None`` as a value is allowed only if the annotation is ``Optional[...]``; without ``default`` the
    field is required. The range applies to numbers only (a ``Union`` with a Literal keeps its strings).
    """
    return field(default=default, metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


def field_range(f: dataclasses.Field) -> Range | None:
    """The :class:`Range` declared with :func:`num`, or None."""
    return f.metadata.get("range")


# ---------------------------------------------------------------------------------------------
# conversion by type

# the one spelling of booleans for config files, overrides and every command line (trainer/cli/args.py)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the annotation ``tp`` as a user means it, else ConfigError naming ``key``.

    Numbers: an int is a valid float; a string that spells a number (``"1e-3"``, as YAML 1.1 reads it) is
    converted; a float with an integral value is a valid int (``1e3`` -> 1000). Floats must be finite.
    Booleans: exactly true/false, yes/no, on/off, 1/0 (any case); nothing else. Literal sets: the string
    itself (``no`` stays ``"no"``; a boolean false from a YAML 1.1 reader becomes ``"no"``/``"off"`` when
    that is in the set).
    Dataclasses: a mapping is built with :func:`from_dict`.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 / Python booleans for on/off style sets
            for c in (("yes", "on", "true") if value else ("no", "off", "false")):
                if c in choices:
                    return c
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not allowed (allowed: {', '.join(map(str, choices))})")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected a boolean (true/false, yes/no, on/off, 1/0), got "
                          f"{type(value).__name__} {value!r}")
    if tp is float or tp is int:
        return _number(value, tp, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected string, got {type(value).__name__} {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return value if item is Any else [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {(k if kt is Any else coerce(k, kt, f"{key} key {k!r}")):
                (v if vt is Any else coerce(v, vt, f"{key}[{k!r}]")) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, {} if value is None else value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def _number(value: Any, tp: type, key: str) -> int | float:
    want = "int" if tp is int else "float"
    x = value
    if isinstance(x, str):
        s = x.strip().replace("_", "")
        try:
            x = int(s) if tp is int and s.lstrip("+-").isdigit() else float(s)
        except ValueError:
            raise ConfigError(f"{key}: expected {want}, got str {value!r}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"{key}: expected {want}, got {type(value).__name__} {value!r}")
    if isinstance(x, float) and not math.isfinite(x):
        raise ConfigError(f"{key}: {value!r} is not allowed (allowed: a finite number)")
    if tp is int:
        if isinstance(x, float):
            if not x.is_integer():
                raise ConfigError(f"{key}: expected int, got {value!r}")
            x = int(x)
        return x
    return float(x)


def type_name(tp: Any) -> str:
    """An annotation in words, as ``--help`` shows it (``Optional[int]`` -> ``int or null``)."""
    return _type_name(tp)


@lru_cache(maxsize=None)
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass (cached)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type, values: Any, where: str) -> Any:
    """Build config dataclass ``cls`` from a mapping; unknown keys and bad values name ``where.key``.

    Errors of the instance's own checks are reported under ``where`` (so a :class:`Phase` built as the
    second list item reports ``finetune.phases[1].train``).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__} {values!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(map(str, values)) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (valid keys{' in ' + where if where else ''}: "
                          f"{', '.join(sorted(names))})")
    own = getattr(cls, "_where", where)
    try:
        return cls(**values)
    except ConfigError as e:
        msg = str(e)
        if own != where and msg.startswith(own):
            msg = where + msg[len(own):]
        raise ConfigError(msg) from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


class Section:
    """Base of every config section: converts and range-checks each field in ``__post_init__``.

    Subclasses set ``_where`` (``"optim"``, ``"train.early_stopping"``) and may override ``_check`` for
    rules between fields (raise :class:`ConfigError` naming every field involved).
    """

    _where: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._where}.{f.name}" if self._where else f.name
            value = coerce(getattr(self, f.name), hints[f.name], key)
            rng = field_range(f)
            if rng is not None and _is_number(value) and not rng.contains(value):
                allowed = str(rng) + (" or null" if f.default is None else "")
                raise ConfigError(f"{key}: {value!r} is not allowed (allowed: {allowed})")
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Rules between fields of this section (none by default)."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def describe(f: dataclasses.Field, tp: Any) -> tuple[str, str]:
    """``(type, allowed)`` of a field in words, for ``--help``."""
    rng = field_range(f)
    allowed = str(rng) if rng is not None else ""
    if rng is not None and f.default is None:
        allowed += " or null"
    return _type_name(tp), allowed
