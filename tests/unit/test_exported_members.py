"""Each public module's ``__all__`` is exactly its public names (httpx's test, per module).

A package's public names are every non-underscore attribute that is not a submodule; a plain
module's are the classes and functions it defines. Either way ``__all__`` names them all, and
nothing else.
"""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

PACKAGES = (
    "asgi_tenancy",
    "asgi_tenancy.operations",
    "asgi_tenancy.operations.migrations",
    "asgi_tenancy.sqlalchemy",
    "asgi_tenancy.sqlguard",
    "asgi_tenancy.testing",
)
MODULES = ("asgi_tenancy.checks", "asgi_tenancy.errors", "asgi_tenancy.fastapi")


def _public(module: types.ModuleType) -> set[str]:
    names = set()
    for member in dir(module):
        value = getattr(module, member)
        if member.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if module.__name__ in MODULES and not (
            (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == module.__name__
        ):
            continue  # a plain module: what it imports is not its surface
        names.add(member)
    names.discard("annotations")  # from __future__ import annotations
    return names


@pytest.mark.parametrize("name", PACKAGES + MODULES)
def test_all_lists_exactly_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__) - {"__version__"}
    public = _public(module)
    if name in MODULES:
        public |= {n for n in exported if hasattr(module, n)}  # constants it defines
    assert exported == public, (sorted(public - exported), sorted(exported - public))


def test_the_top_level_surface_is_the_contract() -> None:
    import asgi_tenancy

    # The contract of ../shared/DESIGN.md, plus the store cache, the chain policy, the log
    # filter and the error families an application catches. Anything more is a decision.
    assert len(asgi_tenancy.__all__) <= 32
