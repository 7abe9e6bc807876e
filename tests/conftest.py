"""The real-PostgreSQL harness every isolation test stands on.

One PostgreSQL per test session: ``TENANCY_TEST_DATABASE_URL`` (a superuser URL) when set,
otherwise a throwaway server from the ``pgserver`` wheel in a temporary folder. On it:

- an admin (superuser) engine, for set-up and for reading back what really happened;
- ``tenancy_app``: NOSUPERUSER, NOBYPASSRLS, owner of no table; every isolation test
  connects through it;
- a fresh database per test module, whose tables the admin owns and whose default privileges
  grant the app role DML only, so a module never sees another module's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.redis_server import NOT_INSTALLED as REDIS_NOT_INSTALLED
from tests.redis_server import RedisServer
from tests.redis_server import binary as redis_binary
from tests.redis_server import running as running_redis

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

APP_ROLE = "tenancy_app"
APP_PASSWORD = "tenancy-app-test"


@dataclass(frozen=True)
class PgServer:
    """A running PostgreSQL reached with a superuser URL."""

    admin_url: URL

    def url(self, database: str, *, app: bool = False) -> str:
        url = self.admin_url.set(drivername="postgresql+asyncpg", database=database)
        if app:
            url = url.set(username=APP_ROLE, password=APP_PASSWORD)
        return url.render_as_string(hide_password=False)


@dataclass(frozen=True)
class PgDatabase:
    """One module's database: admin and app URLs (postgresql+asyncpg)."""

    name: str
    admin_url: str
    app_url: str
    app_role: str = APP_ROLE


async def admin_run(url: str | URL, *statements: str) -> None:
    """Run ``statements`` one by one on ``url`` (an admin's), each committed on its own."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _admin_execute(server: PgServer, database: str, *statements: str) -> None:
    await admin_run(server.url(database), *statements)


def _start_pgserver() -> tuple[URL, object, str]:
    import pgserver

    datadir = tempfile.mkdtemp(prefix="tenancy-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
        server = pgserver.get_server(datadir, cleanup_mode="stop")
    return make_url(server.get_uri()), server, datadir


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    env_url = os.environ.get("TENANCY_TEST_DATABASE_URL")
    handle: object | None = None
    datadir: str | None = None
    if env_url:
        admin_url = make_url(env_url)
    else:
        admin_url, handle, datadir = _start_pgserver()
    server = PgServer(admin_url)
    _ensure_app_role(server)
    try:
        yield server
    finally:
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]
        if datadir is not None:
            shutil.rmtree(datadir, ignore_errors=True)


def _ensure_app_role(server: PgServer) -> None:
    asyncio.run(
        _admin_execute(
            server,
            server.admin_url.database or "postgres",
            f"""
            DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} LOGIN;
              END IF;
            END $$""",
            f"ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
            f"PASSWORD '{APP_PASSWORD}'",
        )
    )


@contextlib.contextmanager
def restartable_pgserver() -> Iterator[tuple[PgServer, Callable[[], None]]]:
    """A PostgreSQL of its own (pgserver, whatever ``TENANCY_TEST_DATABASE_URL`` says), with
    the app role, and a function that restarts it (``pg_ctl restart -m fast``, waiting)."""
    import pgserver

    admin_url, handle, datadir = _start_pgserver()
    server = PgServer(admin_url)
    _ensure_app_role(server)

    def restart() -> None:
        pgserver.pg_ctl(
            ["-w", "restart", "-m", "fast"],
            pgdata=handle.pgdata,  # type: ignore[attr-defined]
            user=handle.system_user,  # type: ignore[attr-defined]
        )

    try:
        yield server, restart
    finally:
        with contextlib.suppress(Exception):  # after a restart pgserver may not know the pid
            pgserver.pg_ctl(
                ["-w", "stop", "-m", "immediate"],
                pgdata=handle.pgdata,  # type: ignore[attr-defined]
                user=handle.system_user,  # type: ignore[attr-defined]
            )
        handle.cleanup()  # type: ignore[attr-defined]
        shutil.rmtree(datadir, ignore_errors=True)


def create_database(server: PgServer, label: str) -> PgDatabase:
    """A fresh database whose future tables grant the app role DML, never ownership."""
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:30]
    name = f"t_{slug}_{uuid.uuid4().hex[:8]}"
    asyncio.run(
        _admin_execute(server, server.admin_url.database or "postgres", f'CREATE DATABASE "{name}"')
    )
    asyncio.run(
        _admin_execute(
            server,
            name,
            # Temporary objects outlive a transaction on a pooled connection: the app role gets
            # none (R018, S005); the admin, a superuser, keeps them for signing sessions.
            f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC',
            f'GRANT CONNECT ON DATABASE "{name}" TO {APP_ROLE}',
            f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}",
            "ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES "
            f"TO {APP_ROLE}",
            f"ALTER DEFAULT PRIVILEGES GRANT USAGE, SELECT ON SEQUENCES TO {APP_ROLE}",
        )
    )
    return PgDatabase(name, server.url(name), server.url(name, app=True))


def drop_database(server: PgServer, db: PgDatabase) -> None:
    asyncio.run(
        _admin_execute(
            server,
            server.admin_url.database or "postgres",
            f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)',
        )
    )


@pytest.fixture(scope="module")
def pg_database(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[PgDatabase]:
    """A database of this test module's own, dropped when the module is done."""
    db = create_database(pg_server, request.module.__name__.rsplit(".", 1)[-1])
    try:
        yield db
    finally:
        drop_database(pg_server, db)


@pytest.fixture
async def admin_engine(pg_database: PgDatabase) -> AsyncIterator[AsyncEngine]:
    """Superuser engine on the module's database: set-up, and reading back what happened."""
    engine = create_async_engine(pg_database.admin_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def app_engine(pg_database: PgDatabase) -> AsyncIterator[AsyncEngine]:
    """Plain engine as the application role (NOSUPERUSER, NOBYPASSRLS, owns nothing)."""
    engine = create_async_engine(pg_database.app_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the test session's own (Debian's redis-server), for job queues and caches."""
    if redis_binary() is None:
        if os.environ.get("CI"):
            pytest.fail(REDIS_NOT_INSTALLED + " (CI must install it: see .ci/run)")
        pytest.skip(REDIS_NOT_INSTALLED)
    with running_redis() as server:
        yield server
