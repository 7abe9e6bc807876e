from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_database_driver_or_web_framework_beyond_starlette() -> None:
    code = (
        "import sys, asgi_tenancy\n"
        "names = ('sqlalchemy', 'asyncpg', 'fastapi', 'jwt', 'pglast', 'celery', 'kombu',"
        " 'arq', 'redis', 'opentelemetry', 'structlog', 'asgi_tenancy.celery',"
        " 'asgi_tenancy.arq', 'asgi_tenancy.opentelemetry', 'asgi_tenancy.keyspace',"
        " 'asgi_tenancy._jobs')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("asgi_tenancy").joinpath("py.typed").is_file()


def test_integration_modules_load_their_library_and_no_data_layer() -> None:
    code = (
        "import sys\n"
        "import asgi_tenancy.keyspace, asgi_tenancy.log\n"
        "assert 'structlog' not in sys.modules and 'redis' not in sys.modules\n"
        "import asgi_tenancy.celery, asgi_tenancy.arq, asgi_tenancy.opentelemetry\n"
        "assert {'celery', 'opentelemetry.sdk.trace'} <= set(sys.modules)\n"
        "print('sqlalchemy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
