"""The layers of the package, read from its source: who may import whom, and no cycles.

Every ``import`` counts, inside functions too; only ``if TYPE_CHECKING:`` blocks (never run)
are left out. The layers, bottom up:

- the context core (``tenant``, ``context``, ``errors``, ``checks``...): the standard library;
- the request boundary (``resolvers``, ``store``, ``middleware``): adds Starlette;
- the request path (``asgi_tenancy.sqlalchemy``): never imports operations;
- operations (``asgi_tenancy.operations``) and the CLI above it; the SQL guard beside it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "asgi_tenancy"
CORE = {
    "asgi_tenancy._keys",
    "asgi_tenancy._options",
    "asgi_tenancy.checks",
    "asgi_tenancy.context",
    "asgi_tenancy.errors",
    "asgi_tenancy.log",
    "asgi_tenancy.store",  # the store protocol and load_tenant: the standard library too
    "asgi_tenancy.tenant",
}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node):
        return
    yield from _imports(node)


def _targets(name: str) -> set[str]:
    """Every module ``name`` imports, absolute names (third-party ones included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            found.add(candidate if candidate in MODULES else base)
    return found


GRAPH = {name: _targets(name) for name in MODULES}


def _ours(targets: set[str]) -> set[str]:
    return {t for t in targets if t in MODULES}


def test_the_request_path_never_imports_operations() -> None:
    offenders = {
        name: sorted(t for t in targets if t.startswith("asgi_tenancy.operations"))
        for name, targets in GRAPH.items()
        if name.startswith("asgi_tenancy.sqlalchemy")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_needs_only_the_standard_library() -> None:
    stdlib = sys.stdlib_module_names
    for name in CORE:
        outside = {
            t
            for t in GRAPH[name]
            if t.split(".")[0] not in stdlib and t not in CORE and t != "__future__"
        }
        assert outside == set(), name


def test_the_sql_guard_does_not_import_the_data_layer_or_operations() -> None:
    for name, targets in GRAPH.items():
        if name.startswith("asgi_tenancy.sqlguard"):
            assert not {
                t
                for t in targets
                if t.startswith(("asgi_tenancy.sqlalchemy", "asgi_tenancy.operations"))
            }, name


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the package's own modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in _ours(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize(
    ("statement", "forbidden"),
    [
        ("import asgi_tenancy", ("sqlalchemy", "asyncpg", "fastapi", "jwt", "pglast", "alembic")),
        ("import asgi_tenancy.cli", ("sqlalchemy", "asyncpg", "alembic", "pglast")),
        ("import asgi_tenancy.sqlalchemy", ("asgi_tenancy.operations", "alembic", "fastapi")),
        ("import asgi_tenancy.operations", ("alembic", "fastapi")),
        ("import asgi_tenancy", ("asgi_tenancy.testing", "pytest")),
        ("import asgi_tenancy.sqlalchemy", ("asgi_tenancy.testing", "pytest")),
    ],
)
def test_importing_loads_only_its_own_layer(statement: str, forbidden: tuple[str, ...]) -> None:
    code = (
        f"import sys\n{statement}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r} or m in {forbidden!r}"
        f" or any(m.startswith(f + '.') for f in {forbidden!r})]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
