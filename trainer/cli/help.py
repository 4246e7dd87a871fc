"""``--help`` text generated from the code itself, so it never drifts from it.

* :func:`config_help`: every config field as ``--section.field``, its type, default, valid range and the
  first sentence of its docstring (the string literal under the field in ``trainer/config/sections/``),
  grouped by section.
* :func:`function_help`: the options of a ``launch/`` script's entry function, from its signature and the
  ``Args:`` section of its docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from functools import lru_cache
from typing import Any, Callable

import yaml

from trainer.config.fields import describe, type_hints, type_name
from trainer.config.schema import SECTIONS, Config


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields are documented by a string literal under them."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def first_sentence(doc: str) -> str:
    """The first sentence of ``doc`` on one line (RST markup ````x```` shown as ``x``)."""
    text = " ".join(doc.split()).replace("``", "")
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if (ch == "." and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " ")
                and not text[:i + 1].endswith(("e.g.", "i.e.", ".."))):
            return text[:i + 1]
    return text


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _show(value: Any) -> str:
    if isinstance(value, str) and value == "(required)":
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _field_lines(cls: type, prefix: str) -> list[str]:
    lines = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = type_hints(cls)[f.name]
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp):  # a nested section: its fields as key.sub.field
            lines.extend(_field_lines(tp, key))
            continue
        type_name, allowed = describe(f, tp)
        head = f"  --{key}  {type_name} = {_show(_default(f))}" + (f"  (allowed: {allowed})" if allowed else "")
        lines.append(head)
        if f.name in docs:
            lines.append(f"      {first_sentence(docs[f.name])}")
    return lines


def config_help(prog: str = "python trainer/main.py") -> str:
    """The ``--help`` text of the trainer: usage, then every config field grouped by section."""
    out = [f"usage: {prog} [--config FILE.yaml] [--section.field=VALUE ...] [--dry_run] [--print_config]",
           "       accelerate launch [launcher flags] trainer/main.py [same options]",
           "",
           "Train an image classifier from a pretrained backbone. Settings come from the defaults below, then",
           "the YAML file given with --config (same sections), then --section.field=VALUE overrides.",
           "",
           "  --config FILE       YAML file with sections data/model/finetune/optim/train/logging (only differences)",
           "  --dry_run           print the parameter groups of the unfreeze timetable and exit (no training)",
           "  --print_config      print the resolved config (YAML + overrides) as YAML and exit",
           "  -h, --help          show this help and exit",
           "",
           f"  --name  str = {_show(Config.name)}",
           f"      {first_sentence(field_docs(Config)['name'])}"]
    for section, cls in SECTIONS.items():
        out += ["", f"{section}: {first_sentence(cls.__doc__ or '')}"]
        out += _field_lines(cls, section)
    out += ["", "Errors in any option end the run before any work with one line naming the field and exit status 2."]
    return "\n".join(out)


def _arg_docs(doc: str) -> dict[str, str]:
    """``Args:`` (or ``Attributes:``) entries of a Google-style docstring: ``{name: text}`` (``a, b: text``
    documents both)."""
    docs: dict[str, str] = {}
    m = re.search(r"^\s*(?:Args|Attributes):\s*\n(.*?)(?:^\s*(?:Returns|Raises|Yields|Examples?|Notes?):|\Z)", doc,
                  re.S | re.M)
    if not m:
        return docs
    current: list[str] = []
    for line in m.group(1).splitlines():
        item = re.match(r"\s{4,8}(\*{0,2}[\w, *]+?):\s*(.*)", line)
        if item and not line.startswith(" " * 12):
            current = [n.strip().lstrip("*") for n in item.group(1).split(",")]
            for n in current:
                docs[n] = item.group(2)
        elif current and line.strip():
            for n in current:
                docs[n] += " " + line.strip()
    return docs


def _keyword_option_lines(spec: str | None, skip: set[str]) -> list[str]:
    if not spec:
        return []
    import importlib

    module, name = spec.split(":")
    cls = getattr(importlib.import_module(module), name)
    docs = _arg_docs(inspect.getdoc(cls) or "")
    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        tail = "  (required)" if isinstance(default, str) and default == "(required)" else f" = {_show(default)}"
        lines.append(f"  --{f.name}  {type_name(type_hints(cls)[f.name])}{tail}")
        if f.name in docs:
            lines.append(f"      {first_sentence(docs[f.name])}")
    return lines


def function_help(fn: Callable, prog: str) -> str:
    """The ``--help`` text of a command from ``fn``'s signature and docstring.

    One entry per option: ``--name  TYPE = DEFAULT`` (or ``(required)``), then the first sentence of its own
    ``Args:`` entry. The type is the annotation in words (``int or null``); an option without one shows ``any``.
    A ``**kwargs`` parameter is listed as ``--SECTION.KEY=VALUE`` (config overrides), preceded by the fields of
    ``fn.keyword_options`` (``"module:Dataclass"``, documented under ``Attributes:``) where ``fn`` sets it.
    """
    from trainer.cli.args import option_types

    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    args = _arg_docs(doc)
    sig = inspect.signature(fn)
    types = option_types(fn)
    P = inspect.Parameter
    lines = [f"usage: {prog} [--option=VALUE ...]" if any(
        p.kind is not P.VAR_POSITIONAL for p in sig.parameters.values()) else f"usage: {prog} ARG [ARG ...]",
             "", summary.replace("``", ""), ""]
    for name, p in sig.parameters.items():
        tp = "any" if types[name] is None else type_name(types[name])
        if p.kind is P.VAR_POSITIONAL:
            head = f"  {name.upper()} ...  {tp}"
        elif p.kind is P.VAR_KEYWORD:
            lines += _keyword_option_lines(getattr(fn, "keyword_options", None), skip=set(sig.parameters))
            lines += ["  --SECTION.KEY=VALUE ...  any",
                      "      a config field, overriding the YAML file (the train command's --help lists them)."]
            continue
        elif p.default is P.empty:
            head = f"  --{name}  {tp}  (required)"
        else:
            head = f"  --{name}  {tp} = {_show(p.default)}"
        lines.append(head)
        if name in args:
            lines.append(f"      {first_sentence(args[name])}")
    lines += ["  -h, --help  show this help and exit", "",
              "Booleans: true/false, yes/no, on/off, 1/0 or a bare --flag (true); a str keeps its text; null: None.",
              "Errors in any option end the command before any work with one line naming it and exit status 2."]
    return "\n".join(lines)
