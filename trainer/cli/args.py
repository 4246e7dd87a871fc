"""One parser for every command line: ``fire`` splits the words, this module converts each value once.

``fire`` stays the dispatcher, but it only tokenizes (``--k=v``, ``--k v``, bare ``--flag``, ``--noflag``,
positional words): :func:`parse_command_line` gives it a wrapper decorated with ``SetParseFn(str)``, so every
value arrives as the text the user typed. Each value is then converted by the type annotation of the
option it sets, with the config loader's rules (:func:`parse_text`, then
:func:`trainer.config.fields.coerce`), the same for ``trainer/main.py``'s ``--section.key`` overrides
(typed by the config field, :func:`config_overrides`) and every ``launch/`` script:

* booleans: exactly ``true/yes/on/1`` or ``false/no/off/0`` (any case), or a bare ``--flag`` (true);
  anything else is refused, naming the flag;
* ``str`` options keep their text verbatim (``--out=007`` is ``"007"``); ``null``/``~``/``None`` is None
  where the option may be None;
* everything else is read as YAML 1.2 (:func:`trainer.config.loading.yaml_load`: ``1e-3`` a float, ``[1, 2]``
  a list, ``{train: a.csv, val: b.csv}`` a mapping, also written without spaces, :func:`yaml_value`);
* an unknown option, a missing required one or a word too many is refused in one line.

Every refusal is a :class:`~trainer.config.fields.ConfigError` (one line, exit status 2 under
:func:`trainer.cli.errors.run_cli`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, Callable, Literal, Sequence, Union

import yaml

from trainer.config.fields import ConfigError, coerce, type_hints
from trainer.config.loading import yaml_load
from trainer.config.schema import Config

NULL_WORDS = ("null", "Null", "NULL", "~", "None")
"""Spellings of None for an option whose type allows it (YAML's, plus Python's ``None``)."""

_NONE = type(None)


def _fix_flow_keys(value: Any) -> Any:
    """Undo YAML's reading of ``{train:a.csv}`` (no space after the colon) as the key ``"train:a.csv"``."""
    if isinstance(value, list):
        return [_fix_flow_keys(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if v is None and isinstance(k, str) and ":" in k:
            k, text = k.split(":", 1)
            v = yaml_value(text) if text.strip() else None
        out[k] = _fix_flow_keys(v)
    return out


def yaml_value(text: str) -> Any:
    """``text`` read as YAML 1.2 (:func:`~trainer.config.loading.yaml_load`), a flow mapping also without spaces.

    ``{train:a.csv,val:b.csv}`` gives ``{"train": "a.csv", "val": "b.csv"}`` like ``{train: a.csv, val: b.csv}``
    (an entry whose key holds a colon and that has no value is split at its first colon).

    Raises:
        yaml.YAMLError: ``text`` is not YAML.
    """
    value = yaml_load(text)
    return _fix_flow_keys(value) if "{" in text else value


def _members(tp: Any) -> tuple[list[Any], bool]:
    """``(types other than None, whether None is allowed)`` of an annotation."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not _NONE], _NONE in args
    return [tp], False


def _is_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is Literal and all(isinstance(c, str) for c in typing.get_args(tp)))


def parse_text(text: str, tp: Any, key: str) -> Any:
    """The value of option ``key`` typed as ``text``, before its conversion to ``tp`` (:func:`coerce`).

    Args:
        text: the word(s) after ``--key=``, as typed.
        tp: the option's annotation (``None``: unknown, read as YAML).
        key: the option's name, for messages.

    Returns:
        ``text`` itself for ``str``/Literal/``bool`` (``coerce`` reads the boolean words), None for a
        :data:`NULL_WORDS` spelling where ``tp`` allows None, else the YAML value of ``text``.

    Raises:
        ConfigError: ``text`` is not valid YAML where a YAML value is needed (names ``key``).
    """
    if tp is None or tp is Any:
        try:
            return yaml_value(text)
        except yaml.YAMLError:
            return text
    members, optional = _members(tp)
    if optional and text.strip() in NULL_WORDS:
        return None
    if len(members) == 1 and (_is_text(members[0]) or members[0] is bool):
        return text
    try:
        value = yaml_value(text)
    except yaml.YAMLError as e:
        if any(_is_text(m) for m in members):
            return text
        raise ConfigError(f"{key}: {text!r} is not valid YAML ({' '.join(str(e).split())})") from None
    if any(_is_text(m) for m in members):  # e.g. str | dict, str | int: text unless it reads as another member
        if isinstance(value, str):
            return text
        try:
            return coerce(value, Union[tuple(m for m in members if not _is_text(m))], key)
        except ConfigError:
            return text
    return value


def convert(text: str, tp: Any, key: str) -> Any:
    """``text`` converted to annotation ``tp`` (:func:`parse_text` then :func:`coerce`); ``tp`` None: YAML.

    Raises:
        ConfigError: the value does not fit ``tp`` (e.g. ``--tta=maybe``), naming ``key``.
    """
    value = parse_text(text, tp, key)
    return value if tp is None or tp is Any else coerce(value, tp, key)


def config_field_type(dotted: str, cls: type = Config) -> Any | None:
    """Annotation of the config field ``dotted`` (``"train.overwrite"`` -> ``bool``); None if there is none."""
    tp: Any = cls
    for part in dotted.replace("-", "_").split("."):
        members, _ = _members(tp)
        section = next((m for m in members if dataclasses.is_dataclass(m)), None)
        if section is None:
            return None
        tp = type_hints(section).get(part)
        if tp is None:
            return None
    return tp


def config_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``--section.key=TEXT`` overrides with each text value typed by its config field (:func:`parse_text`).

    Values that are not strings (from Python callers) are kept. Unknown keys are read as YAML; the config
    loader refuses them. The result goes to ``load_config(..., parse_strings=False)``, which converts each
    value by its field (:func:`coerce`), so a value is read once.

    Raises:
        ConfigError: a value that is not valid YAML where one is needed (names the key).
    """
    return {k: parse_text(v, config_field_type(k), k) if isinstance(v, str) else v for k, v in overrides.items()}


def option_types(fn: Callable) -> dict[str, Any]:
    """``{parameter: annotation}`` of ``fn`` with string annotations resolved (None where there is none)."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # pragma: no cover - an annotation that cannot be resolved
        hints = {}
    return {name: hints.get(name) for name in inspect.signature(fn).parameters}


def _unknown(key: str, names: Sequence[str], argv: Sequence[str]) -> ConfigError:
    shown = key
    if any(a.lstrip("-") == f"no{key}" for a in argv):  # fire reads a bare --noX as X=False
        shown = f"no{key}"
    close = difflib.get_close_matches(shown, names, n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    return ConfigError(f"unknown option --{shown}{hint} (options: {', '.join('--' + n for n in names)})")


def _bare(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` appears in ``argv`` without a value (fire then passes "True")."""
    return any(t.startswith("-") and "=" not in t and t.lstrip("-").replace("-", "_") == name
               and (i + 1 == len(argv) or argv[i + 1].startswith("--")) for i, t in enumerate(argv))


def _check_repeats(argv: Sequence[str]) -> None:
    """Refuse an option given twice (fire would keep the last one silently)."""
    values: dict[str, list[str]] = {}
    for t in argv:
        if t == "--":
            break
        if t.startswith("--") and len(t) > 2:
            key, _, value = t[2:].partition("=")
            values.setdefault(key.replace("-", "_"), []).append(value)
    for key, vals in values.items():
        if len(vals) > 1:
            hint = ""
            if all(":" in v and "{" not in v for v in vals):  # bash turned --k={a:x,b:y} into --k=a:x --k=b:y
                hint = (f"; the shell expanded {{{','.join(vals)}}} into {len(vals)} options: quote the mapping, "
                        f"'--{key}={{{', '.join(v.replace(':', ': ', 1) for v in vals)}}}'")
            raise ConfigError(f"--{key} is given {len(vals)} times{hint}")


def _tokenize(fn: Callable, argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """fire's reading of ``argv`` as ``(positional words, {option: text})``, nothing converted."""
    import fire
    from fire import decorators

    P = inspect.Parameter
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind not in (P.VAR_POSITIONAL,
                                                                                          P.VAR_KEYWORD)]
    seen: list = []

    def words(*args, **kwargs):
        seen.append((list(args), kwargs))

    # the real names as keyword-only parameters: fire then reads a bare --name as "True" and --noname as
    # "False"; every other flag and every positional word lands in **kwargs / *args, so nothing is left over
    # for fire to apply to the result
    words.__signature__ = inspect.Signature(
        [P("args", P.VAR_POSITIONAL), *(P(n, P.KEYWORD_ONLY, default=None) for n in names),
         P("kwargs", P.VAR_KEYWORD)])
    fire.Fire(decorators.SetParseFn(str)(words), command=list(argv), name=getattr(fn, "__name__", "command"),
              serialize=lambda _: None)
    if not seen:  # pragma: no cover - fire consumed the words itself (e.g. its own flags after `--`)
        raise ConfigError(f"could not read the command line {' '.join(argv)!r}")
    args, kwargs = seen[0]
    return args, {k: v for k, v in kwargs.items() if v is not None}


def parse_command_line(fn: Callable, argv: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` to call ``fn`` with for the command line ``argv``, each value converted once.

    Positional words fill ``fn``'s positional parameters not given by name, in order (all of them go to
    ``*args`` where ``fn`` has one). Values of a ``**kwargs`` parameter stay text (the function types them,
    e.g. config overrides with :func:`config_overrides`).

    Raises:
        ConfigError: unknown option (with the closest valid one), a word too many, a required option
            missing, an option given twice (e.g. a mapping the shell's brace expansion split: the message
            says to quote it), a bare ``--name`` for an option that is not a boolean, or a value that does
            not fit its option's type (names the option).
    """
    P = inspect.Parameter
    params = inspect.signature(fn).parameters
    tps = option_types(fn)
    _check_repeats(argv)
    words, given = _tokenize(fn, argv)
    named = [n for n, p in params.items() if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    var_kw = any(p.kind is P.VAR_KEYWORD for p in params.values())
    extra = {}
    for key in list(given):
        if key not in named:
            if not var_kw:
                raise _unknown(key, named, argv)
            extra[key] = given.pop(key)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, p in params.items():
        if p.kind is P.VAR_POSITIONAL:
            args.extend(convert(w, tps[name], name) for w in words)
            words = []
        elif name in given:
            if _bare(argv, name) and bool not in _members(tps[name])[0]:
                raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
            kwargs[name] = convert(given[name], tps[name], f"--{name}")
        elif p.kind is P.POSITIONAL_OR_KEYWORD and words and not any(a.kind is P.VAR_POSITIONAL
                                                                     for a in params.values()):
            kwargs[name] = convert(words.pop(0), tps[name], f"--{name}")
        elif p.default is P.empty and p.kind is not P.VAR_KEYWORD:
            raise ConfigError(f"--{name} is required")
    if words:
        raise ConfigError(f"unexpected argument {words[0]!r} (options are given as --name=value)")
    kwargs.update(extra)
    return args, kwargs
