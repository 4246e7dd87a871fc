"""The package layout's rules (docs/architecture.md "Layout"): no import cycles, between modules or between subpackages;
every import allowed by its subpackage's docstring; no private name imported across subpackages; one ``torch.load``.

Read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every ``import``/``from
... import`` of a ``trainer`` module in ``a``. Module level: the imports that run when ``a`` is imported
(not the lazy ones inside functions, not ``if TYPE_CHECKING:``). Subpackage level: every import,
lazy ones included, so ``trainer.config -> trainer.data -> trainer.config`` is a cycle however it is
spelled.

Import rules (:func:`layout_violations`): each subpackage's ``__init__.py`` docstring ends with
``May import: trainer.a, trainer.b.module.`` (``nothing`` for none; the list may go on over lines and
ends with a full stop at the end of a line) and optionally ``Imported only by:
trainer.c.`` (no ``trainer.`` name: only the entry points). Every import of every module (lazy ones and
``if TYPE_CHECKING:`` ones included) into another subpackage must name a listed subpackage or module (or
one inside it), and the importing subpackage must be allowed by the target's ``Imported only by``. No
module imports a private name (``_x``, or a module ``_x``) of another subpackage. Modules directly in
``trainer/`` (``trainer/main.py``) are entry points: only the private-name rule applies to them. A folder
without ``__init__.py`` is not a package and is not seen.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "trainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(pkg: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of package folder ``pkg`` whose folders (``pkg`` included)
    all hold an ``__init__.py`` (a folder being written without one is not seen)."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        folders = [path.parent, *path.parent.parents]
        if all((d / "__init__.py").is_file() for d in folders[:folders.index(pkg) + 1]):
            parts = path.relative_to(pkg.parent).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = find_modules(PKG)


def _target(name: str) -> str | None:
    """The trainer module ``name`` refers to (a module, or the package it is a name of), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, *, lazy: bool) -> set[str]:
    """Names imported (``from a.b import c`` gives ``a.b.c``; ``_target`` finds the module)."""
    out: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not lazy:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    visit(sub)

    visit(tree.body)
    return out


def _graph(*, lazy: bool, level) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        src = level(name)
        for imported in _imports(ast.parse(path.read_text()), lazy=lazy):
            dst = _target(imported) if imported.startswith("trainer") else None
            if dst is not None and level(dst) != src:
                graph.setdefault(src, set()).add(level(dst))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := dfs(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
    tree = ast.parse("import trainer.x\nfrom trainer.y import z\nif TYPE_CHECKING:\n    import trainer.t\n"
                     "def f():\n    import trainer.lazy\n")
    assert _imports(tree, lazy=False) == {"trainer.x", "trainer.y.z"}
    assert _imports(tree, lazy=True) == {"trainer.x", "trainer.y.z", "trainer.lazy"}


def test_no_import_cycle_between_modules():
    graph = _graph(lazy=False, level=lambda m: m)
    assert len(graph) > 20  # the graph was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_cycle_between_subpackages():
    graph = _graph(lazy=True, level=_subpackage)
    assert "trainer.train" in graph and "trainer.config" in graph["trainer.train"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# ----------------------------------------------------------------------------------------------
# "May import" / "Imported only by" of each subpackage's docstring, private names


@dataclass(frozen=True)
class ImportRule:
    """A subpackage's rule: ``may_import`` (subpackages or modules; None when its docstring has no
    ``May import:`` line) and ``imported_by`` (importing subpackages; None: anyone)."""

    may_import: frozenset[str] | None
    imported_by: frozenset[str] | None


def import_rule(docstring: str, top: str) -> ImportRule:
    """The rule stated by a ``__init__`` docstring (see module docstring); ``top``: the package name."""
    names = {}
    for key in ("May import", "Imported only by"):
        m = re.search(rf"^{key}:(.*?)(?:\.[ \t]*$|\n\s*\n|\Z)", docstring, re.MULTILINE | re.DOTALL)
        names[key] = None if m is None else frozenset(re.findall(rf"\b{top}(?:\.\w+)+", m.group(1)))
    return ImportRule(names["May import"], names["Imported only by"])


def _import_targets(tree: ast.Module, module: str, is_package: bool):
    """``(line, imported module or name, bound name or None)`` of every import of ``tree``, lazy and
    ``TYPE_CHECKING`` ones included; relative imports resolved against ``module``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                yield node.lineno, f"{base}.{a.name}", a.name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layout_violations(pkg: Path) -> list[str]:
    """Every break of the import rules (module docstring) in package folder ``pkg``, one line each
    (``"<module>:<line>: ..."``); empty when the package keeps them."""
    top = pkg.name
    modules = find_modules(pkg)
    rules = {name: import_rule(ast.get_docstring(ast.parse(path.read_text())) or "", top)
             for name, path in modules.items() if name.count(".") == 1 and path.name == "__init__.py"}
    out = [f"{sub}: its __init__ docstring has no 'May import:' line" for sub, r in rules.items()
           if r.may_import is None]

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        src = ".".join(name.split(".")[:2]) if ".".join(name.split(".")[:2]) in rules else None
        for line, imported, bound in _import_targets(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            dst = target(imported) if imported.split(".")[0] == top else None
            dst_sub = dst and ".".join(dst.split(".")[:2])
            if dst is None or dst_sub == src or dst_sub not in rules:
                continue
            where = f"{name}:{line}"
            private = [p for p in imported.split(".")[1:] if _is_private(p)]
            if private:
                out.append(f"{where}: imports the private name {private[0]} of {dst_sub} ({imported})")
            if src is None:
                continue  # an entry point
            may = rules[src].may_import or frozenset()
            if not any(dst == m or dst.startswith(m + ".") for m in may):
                out.append(f"{where}: imports {dst}, not in {src}'s 'May import' list ({', '.join(sorted(may))})")
            by = rules[dst_sub].imported_by
            if by is not None and src not in by:
                out.append(f"{where}: imports {dst}, but {dst_sub} is imported only by {sorted(by) or 'entry points'}")
    return list(dict.fromkeys(out))  # one line per module, line and target


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_layout_checker_reports_each_violation(tmp_path):
    """A synthetic package ``pkg``: every kind of violation is reported, and none once they are removed."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/main.py": "from pkg.high.use import run\n",
        "pkg/low/__init__.py": '"""Low.\n\nMay import: nothing.\nImported only by: pkg.high.\n"""\n',
        "pkg/low/core.py": "def _helper():\n    pass\n\n\ndef helper():\n    pass\n",
        "pkg/high/__init__.py": '"""High.\n\nMay import: pkg.low.core,\npkg.low.other.\n"""\n',
        "pkg/high/use.py": "from pkg.low.core import _helper\n\n\ndef run():\n    return _helper()\n",
        "pkg/side/__init__.py": '"""Side.\n\nMay import: pkg.low.\n"""\n',
        "pkg/side/x.py": "def f():\n    from ..low import core\n    import pkg.high.use\n    return core, pkg\n",
        "pkg/nodoc/__init__.py": '"""No rule."""\n',
        "pkg/wip/x.py": "from pkg.low.core import _helper\n",  # no __init__.py yet: not seen
    })
    found = layout_violations(tmp_path / "pkg")
    assert found == [
        "pkg.nodoc: its __init__ docstring has no 'May import:' line",
        "pkg.high.use:1: imports the private name _helper of pkg.low (pkg.low.core._helper)",
        "pkg.side.x:2: imports pkg.low.core, but pkg.low is imported only by ['pkg.high']",
        "pkg.side.x:3: imports pkg.high.use, not in pkg.side's 'May import' list (pkg.low)",
    ], found
    _write(tmp_path, {
        "pkg/high/use.py": "from pkg.low.core import helper\n\n\ndef run():\n    return helper()\n",
        "pkg/side/__init__.py": '"""Side.\n\nMay import: pkg.high, pkg.low.\n"""\n',
        "pkg/low/__init__.py": '"""Low.\n\nMay import: nothing.\nImported only by: pkg.high, pkg.side.\n"""\n',
        "pkg/nodoc/__init__.py": '"""A rule.\n\nMay import: nothing.\n"""\n',
    })
    assert layout_violations(tmp_path / "pkg") == []


def test_every_import_keeps_its_subpackages_rule():
    rules = {name: import_rule(ast.get_docstring(ast.parse(path.read_text())) or "", "trainer")
             for name, path in MODULES.items() if name.count(".") == 1 and path.name == "__init__.py"}
    assert {"trainer.config", "trainer.data", "trainer.train", "trainer.files"} <= set(rules)
    assert rules["trainer.files"].may_import == frozenset()
    assert rules["trainer.selection"].imported_by == {"trainer.planner"}
    assert layout_violations(PKG) == []


# ----------------------------------------------------------------------------------------------
# torch.load in one module

TORCH_LOAD_HOME = "trainer/models/state_dict.py"


def torch_load_calls(source: str) -> list[int]:
    """Lines of ``source`` that call ``torch.load`` (also as ``torch.serialization.load``) or import it by name."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name | ast.Attribute):
            owner = ast.unparse(node.value)
            if owner in ("torch", "torch.serialization"):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            lines += [node.lineno for a in node.names if a.name == "load"]
    return sorted(lines)


def test_torch_load_is_called_in_one_module():
    assert torch_load_calls("import torch\nx = torch.load(p)\ny = json.load(f)\nfrom torch import load\n") == [2, 4]
    found = {}
    for folder in ("trainer", "launch", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if (lines := torch_load_calls(path.read_text())) and rel != TORCH_LOAD_HOME:
                found[rel] = lines
    assert found == {}, f"torch.load outside {TORCH_LOAD_HOME} (use safe_torch_load): {found}"
    assert torch_load_calls((ROOT / TORCH_LOAD_HOME).read_text())
