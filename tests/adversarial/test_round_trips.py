"""Binding a tenant costs no round trip: counted on the wire by a loopback proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import FairShares, RowLevelSecurity, TenantDatabase
from benchmarks.wire import WireProxy
from tests.adversarial.models import Base, Project, seed_rows
from tests.conftest import PgDatabase

ACME = Tenant("acme")


def _strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


async def _set_up(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await _strategy().install(conn)
        for table, rows in seed_rows().items():
            await conn.execute(insert(Base.metadata.tables[table]), rows)
    await engine.dispose()


@pytest.fixture(scope="module")
def rls_database(pg_database: PgDatabase) -> PgDatabase:
    asyncio.run(_set_up(pg_database.admin_url))
    return pg_database


@pytest.fixture
async def proxy(rls_database: PgDatabase) -> AsyncIterator[tuple[WireProxy, str]]:
    """The app URL rewritten to go through a counting proxy on 127.0.0.1."""
    url = make_url(rls_database.app_url)
    socket_dir = url.query.get("host")
    if socket_dir:
        target = WireProxy(unix_path=f"{socket_dir}/.s.PGSQL.{url.port or 5432}")
    else:
        target = WireProxy(host=url.host, port=url.port or 5432)
    async with target as running:
        proxied = url.set(host="127.0.0.1", port=running.port, query={})
        yield running, proxied.render_as_string(hide_password=False)


async def test_a_bound_session_costs_the_same_round_trips_as_a_plain_one(
    proxy: tuple[WireProxy, str],
) -> None:
    wire, url = proxy
    db = TenantDatabase(url, _strategy(), engine_options={"pool_size": 1, "max_overflow": 0})
    await db.validate()
    try:
        counts = []
        for i in range(4):
            before = wire.counter.round_trips
            async with tenant_scope(ACME), db.session() as s:
                assert (await s.get(Project, ("acme", i + 1))) is not None
            counts.append(wire.counter.round_trips - before)
        # The first request also connects and prepares; then BEGIN+binding, SELECT, ROLLBACK.
        assert counts[1:] == [3, 3, 3]

        before = wire.counter.round_trips
        async with tenant_scope(ACME), db.session() as s:
            await s.get(Project, ("acme", 5))
            await s.commit()
            await s.get(Project, ("acme", 6))
        # Two transactions, each bound inside its BEGIN: 3 + 3, nothing added by the commit trap.
        assert wire.counter.round_trips - before == 6
    finally:
        await db.dispose()


async def test_a_fair_share_and_a_statement_timeout_cost_no_round_trip(
    proxy: tuple[WireProxy, str],
) -> None:
    wire, url = proxy
    db = TenantDatabase(
        url,
        _strategy(),
        engine_options={"pool_size": 2, "max_overflow": 0},
        shares=FairShares(connections=1, statement_timeout=1234),
    )
    await db.validate()
    slow = Tenant("acme", attributes={"statement_timeout_ms": 4321})
    try:
        counts = []
        for tenant in (ACME, ACME, slow, slow, ACME):
            before = wire.counter.round_trips
            async with tenant_scope(tenant), db.session() as s:
                assert (await s.get(Project, ("acme", 1))) is not None
            counts.append(wire.counter.round_trips - before)
        # BEGIN + binding + timeout in one message, SELECT, ROLLBACK: as a plain session.
        assert counts[1:] == [3, 3, 3, 3]

        for tenant, expected in ((ACME, "1234ms"), (slow, "4321ms")):
            async with tenant_scope(tenant), db.session() as s:
                assert await s.scalar(text("SHOW statement_timeout")) == expected
                await s.commit()  # the next transaction of the session gets it too
                assert await s.scalar(text("SHOW statement_timeout")) == expected
                assert await s.scalar(text("SELECT current_setting('app.tenant_id')")) == "acme"
    finally:
        await db.dispose()
