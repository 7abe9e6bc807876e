"""docs/getting-started.md's quick start, run as written: its SQL, its files, its curl commands.

Every block with a ``title`` is taken from the page as it stands: the SQL runs statement by
statement as the page says (superuser, then owner), the Python files are written into a fresh
folder and run with the documented commands, and each ``curl`` line is sent and its answer
compared, byte for byte, with the comment under it. Only the URLs (host, port) are this test's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import PgServer
from tests.examples._process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "getting-started.md"
BLOCK = re.compile(r'^```\w+ title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)
ROLES = ("myapp_app", "myapp_owner")
DATABASE = "myapp"


def blocks() -> dict[str, str]:
    found = {title: body for title, body in BLOCK.findall(PAGE.read_text())}
    expected = {"roles.sql", "myapp/models.py", "myapp/setup_db.py", "grants.sql", "locks.sql"}
    assert expected | {"myapp/app.py", "try.sh"} <= set(found), sorted(found)
    return found


def statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def as_role(server: PgServer, role: str, password: str, database: str) -> URL:
    return server.admin_url.set(
        drivername="postgresql+asyncpg", username=role, password=password, database=database
    )


async def run_sql(url: URL, sql: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements(sql):
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def fetch(url: URL, sql: str) -> list[tuple[object, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(text(sql))]
    finally:
        await engine.dispose()


@pytest.fixture
def cluster(pg_server: PgServer) -> Iterator[PgServer]:
    """The server, without the page's roles and database before and after the test."""
    admin = pg_server.admin_url.set(drivername="postgresql+asyncpg")
    exists = asyncio.run(
        fetch(
            admin,
            "SELECT rolname FROM pg_roles WHERE rolname IN ('myapp_app', 'myapp_owner') "
            "UNION ALL SELECT datname FROM pg_database WHERE datname = 'myapp'",
        )
    )
    if exists:
        pytest.fail(f"{exists} already exist on the test server; the quick start would reuse them")
    try:
        yield pg_server
    finally:
        cleanup = f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE);'
        cleanup += "".join(f"DROP ROLE IF EXISTS {role};" for role in ROLES)
        asyncio.run(run_sql(admin, cleanup))


def test_the_quick_start_runs_as_written(cluster: PgServer, tmp_path: Path) -> None:
    page = blocks()
    admin = cluster.admin_url.set(drivername="postgresql+asyncpg")
    owner = as_role(cluster, "myapp_owner", "owner-secret", DATABASE)
    app_role = as_role(cluster, "myapp_app", "app-secret", DATABASE)

    asyncio.run(run_sql(admin, page["roles.sql"]))  # 1. as a superuser
    for name in ("myapp/__init__.py", "myapp/models.py", "myapp/setup_db.py", "myapp/app.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(page.get(name, ""))  # 2. __init__.py: empty, as the page says
    env = {
        **os.environ,
        "MYAPP_OWNER_URL": owner.render_as_string(hide_password=False),
        "MYAPP_DATABASE_URL": app_role.render_as_string(hide_password=False),
    }
    setup = ServerProcess([sys.executable, "-m", "myapp.setup_db"], cwd=tmp_path, env=env)
    assert setup.process.wait(timeout=120) == 0, setup.output  # 3. as the owner
    setup.kill()
    asyncio.run(run_sql(owner, page["grants.sql"]))  # 4. as the owner
    asyncio.run(run_sql(admin.set(database=DATABASE), page["locks.sql"]))  # as a superuser

    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "myapp.app:app", "--port", str(port)]
    server = ServerProcess(command, cwd=tmp_path, env=env, port=port)  # 5.
    try:
        server.wait_for("Uvicorn running on")
        tried = try_commands(page["try.sh"], f"127.0.0.1:{port}")  # 6.
        # uvicorn shuts down gracefully (the lifespan disposes the engines), then re-raises.
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    finally:
        server.kill()
    assert tried == 6
    assert any("Application shutdown complete" in line for line in server.output)
    assert not [line for line in server.output if "Traceback" in line], server.output

    rows = asyncio.run(fetch(admin.set(database=DATABASE), "SELECT id, tenant_id, name FROM items"))
    assert sorted(rows) == [(1, "acme", "anvil"), (2, "globex", "laser")]
    session_locks = (  # the eight session-level lock functions, as the app role sees them
        "SELECT has_function_privilege(oid, 'EXECUTE') FROM pg_proc"
        " WHERE proname ~ '^pg_(try_)?advisory_lock'"
    )
    assert asyncio.run(fetch(app_role, session_locks)) == [(False,)] * 8


@pytest.mark.parametrize(
    ("left_out", "code"),
    [("ON items TO", "R021"), ("ON SEQUENCE items_id_seq", "R022"), ("ON tenants TO", "T001")],
)
def test_each_grant_of_the_quick_start_is_needed_and_named_at_start_up(
    cluster: PgServer, tmp_path: Path, left_out: str, code: str
) -> None:
    """Leave one grant of step 4 out: the app refuses to start, with one log line naming the
    code and the GRANT that is missing, instead of failing its first INSERT or answering 503."""
    page = blocks()
    admin = cluster.admin_url.set(drivername="postgresql+asyncpg")
    owner = as_role(cluster, "myapp_owner", "owner-secret", DATABASE)
    app_role = as_role(cluster, "myapp_app", "app-secret", DATABASE)
    asyncio.run(run_sql(admin, page["roles.sql"]))
    for name in ("myapp/__init__.py", "myapp/models.py", "myapp/setup_db.py", "myapp/app.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(page.get(name, ""))
    env = {
        **os.environ,
        "MYAPP_OWNER_URL": owner.render_as_string(hide_password=False),
        "MYAPP_DATABASE_URL": app_role.render_as_string(hide_password=False),
    }
    setup = ServerProcess([sys.executable, "-m", "myapp.setup_db"], cwd=tmp_path, env=env)
    assert setup.process.wait(timeout=120) == 0, setup.output
    setup.kill()
    grants = statements(page["grants.sql"])
    kept = [g for g in grants if left_out not in g]
    assert len(kept) == len(grants) - 1
    asyncio.run(run_sql(owner, ";".join(kept)))
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "myapp.app:app", "--port", str(port)]
    server = ServerProcess(command, cwd=tmp_path, env=env, port=port)
    try:
        server.wait_for("Application startup failed")
    finally:
        server.kill()
    [line] = [x for x in server.output if "start-up check failed" in x]
    assert f"[{code}] " in line
    assert "GRANT " in line
    assert "TO myapp_app" in line


def try_commands(script: str, address: str) -> int:
    """Send each ``curl`` line; the ``# STATUS BODY`` comment under it is the expected answer."""
    lines = script.strip().splitlines()
    commands = list(zip(lines[::2], lines[1::2], strict=True))
    for command, expected in commands:
        args = shlex.split(command)
        assert args[:2] == ["curl", "-s"], command
        method, headers, body, url = "GET", {}, None, None
        options = iter(args[2:])
        for arg in options:
            if arg == "-X":
                method = next(options)
            elif arg == "-H":
                name, value = next(options).split(": ", 1)
                headers[name] = value
            elif arg == "-d":
                body = next(options)
            else:
                url = "http://" + arg.replace("localhost:8000", address)
        assert url is not None, command
        response = httpx.request(method, url, headers=headers, content=body)
        status, _, expected_body = expected.removeprefix("# ").partition(" ")
        assert (response.status_code, response.text) == (int(status), expected_body), command
    return len(commands)
