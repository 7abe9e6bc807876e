from __future__ import annotations

import subprocess
import sys

import asgi_tenancy


def test_import_loads_no_database_driver_or_web_framework_beyond_starlette() -> None:
    code = (
        "import sys, asgi_tenancy\n"
        "names = ('sqlalchemy', 'asyncpg', 'fastapi', 'jwt', 'pglast')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(asgi_tenancy) if not name.startswith("_")}
    modules = {"context", "errors", "store", "tenant"}
    assert set(asgi_tenancy.__all__) - {"__version__"} == public - modules - _submodules_loaded()


def _submodules_loaded() -> set[str]:
    import types

    return {
        name
        for name in dir(asgi_tenancy)
        if isinstance(getattr(asgi_tenancy, name), types.ModuleType)
    }


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("asgi_tenancy").joinpath("py.typed").is_file()
