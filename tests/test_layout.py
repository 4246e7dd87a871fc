"""The package layout's rules (docs/architecture.md "Layout"): no import cycles, between modules or between subpackages.

Read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every ``import``/``from
... import`` of a ``trainer`` module in ``a``. Module level: the imports that run when ``a`` is imported
(not the lazy ones inside functions, not ``if TYPE_CHECKING:``). Subpackage level: every import,
lazy ones included, so ``trainer.config -> trainer.data -> trainer.config`` is a cycle however it is
spelled.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "trainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


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
