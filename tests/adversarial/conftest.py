"""Fixtures of the RLS modules: the database set up once per module, a validated TenantDatabase.

Each module defines ``rls_strategy`` (plain or signed); these fixtures build on it. Also the
session's PgBouncer (transaction pooling) in front of the test server, for test_pgbouncer.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.adversarial import pgbouncer as bouncer
from tests.adversarial.models import Base, seed_rows
from tests.conftest import PgDatabase, PgServer


async def _set_up(url: str, strategy: RowLevelSecurity) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await strategy.install(conn)
        for table, rows in seed_rows(("acme", "globex", "initech")).items():
            await conn.execute(insert(Base.metadata.tables[table]), rows)
    await engine.dispose()


@pytest.fixture(scope="module")
def rls_database(pg_database: PgDatabase, rls_strategy: RowLevelSecurity) -> PgDatabase:
    asyncio.run(_set_up(pg_database.admin_url, rls_strategy))
    return pg_database


@pytest.fixture
async def db(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> AsyncIterator[TenantDatabase]:
    database = TenantDatabase(
        rls_database.app_url,
        rls_strategy,
        engine_options={"pool_size": 1, "max_overflow": 0},
    )
    await database.validate()
    yield database
    await database.dispose()


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> Iterator[bouncer.PgBouncer]:
    """Debian's PgBouncer in transaction mode in front of the test server, for the session."""
    if bouncer.binary() is None:
        if os.environ.get("CI"):
            pytest.fail(bouncer.NOT_INSTALLED + " (CI must install it: see .ci/run)")
        pytest.skip(bouncer.NOT_INSTALLED)
    with bouncer.running(pg_server) as running:
        yield running
