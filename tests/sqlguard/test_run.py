"""``SqlGuard.run``: read only, a transaction-local timeout, a row cap, as the app role."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from asgi_tenancy import Tenant, TenantContextError, UnsafeQuery, tenant_scope
from asgi_tenancy.sqlalchemy import QueryScoping, TenantDatabase
from asgi_tenancy.sqlguard import SqlGuard

GUARD = SqlGuard({"runs": "tenant_id"})


@pytest.fixture
async def session(
    admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> AsyncIterator[AsyncSession]:
    async with admin_engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS runs"))
        await conn.execute(text("CREATE TABLE runs (tenant_id text NOT NULL, id int NOT NULL)"))
        await conn.execute(
            text(
                "INSERT INTO runs SELECT t, i FROM unnest(ARRAY['acme', 'globex']) t, "
                "generate_series(1, 50) i"
            )
        )
    async with AsyncSession(app_engine) as s:
        yield s


async def test_run_returns_only_the_tenants_rows_as_the_app_role(session: AsyncSession) -> None:
    async with tenant_scope(Tenant("acme")):
        rows = await GUARD.run(session, "SELECT tenant_id, id FROM runs ORDER BY id")
    assert len(rows) == 50
    assert {row["tenant_id"] for row in rows} == {"acme"}
    assert [row["id"] for row in rows] == list(range(1, 51))


async def test_run_caps_the_rows(session: AsyncSession) -> None:
    async with tenant_scope(Tenant("globex")):
        rows = await GUARD.run(session, "SELECT * FROM runs ORDER BY id", max_rows=7)
    assert [row["id"] for row in rows] == list(range(1, 8))


async def test_run_stops_a_slow_query_at_the_timeout(session: AsyncSession) -> None:
    async with tenant_scope(Tenant("acme")):
        with pytest.raises(DBAPIError, match="statement timeout"):
            await GUARD.run(
                session,
                "SELECT count(*) FROM generate_series(1, 1000000000) g",
                timeout_ms=50,
            )


async def test_run_is_read_only_and_sets_the_timeout_inside_the_transaction(
    session: AsyncSession, app_engine: AsyncEngine
) -> None:
    sent: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    event.listen(app_engine.sync_engine, "before_cursor_execute", record)
    try:
        async with tenant_scope(Tenant("acme")):
            await GUARD.run(session, "SELECT id FROM runs")
    finally:
        event.remove(app_engine.sync_engine, "before_cursor_execute", record)
    assert sent[0] == "SET TRANSACTION READ ONLY"
    assert "statement_timeout" in sent[1]
    assert "runs" in sent[-1]


async def test_run_inside_an_open_transaction_leaves_it_as_it_was(
    session: AsyncSession,
) -> None:
    await session.execute(text("SELECT 1"))  # the caller's transaction is open
    async with tenant_scope(Tenant("acme")):
        rows = await GUARD.run(session, "SELECT id FROM runs", timeout_ms=1234)
    assert len(rows) == 50
    assert session.in_transaction()
    assert (await session.execute(text("SHOW transaction_read_only"))).scalar() == "off"
    assert (await session.execute(text("SHOW statement_timeout"))).scalar() == "0"
    await session.execute(text("INSERT INTO runs VALUES ('acme', 99)"))
    await session.rollback()


async def test_run_refuses_before_sending_anything(
    session: AsyncSession, app_engine: AsyncEngine
) -> None:
    sent: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    event.listen(app_engine.sync_engine, "before_cursor_execute", record)
    try:
        with pytest.raises(TenantContextError):
            await GUARD.run(session, "SELECT id FROM runs")
        async with tenant_scope(Tenant("acme")):
            with pytest.raises(UnsafeQuery):
                await GUARD.run(session, "DELETE FROM runs")
            with pytest.raises(ValueError, match="max_rows"):
                await GUARD.run(session, "SELECT id FROM runs", max_rows=0)
    finally:
        event.remove(app_engine.sync_engine, "before_cursor_execute", record)
    assert sent == []


async def test_run_keeps_duplicate_column_names_and_trailing_comments(
    session: AsyncSession,
) -> None:
    async with tenant_scope(Tenant("acme")):
        rows = await GUARD.run(
            session,
            "SELECT a.id, b.id FROM runs a JOIN runs b ON b.id = a.id + 1 "
            "WHERE a.id < 3 ORDER BY a.id -- last line comment",
        )
    assert [tuple(row.values()) for row in rows] == [(1, 2), (2, 3)]


async def test_run_passes_query_scoping_which_refuses_other_raw_sql(
    session: AsyncSession, app_engine: AsyncEngine
) -> None:
    metadata = MetaData()
    Table("runs", metadata, Column("tenant_id", Text, nullable=False), Column("id", Integer))
    database = TenantDatabase(app_engine, QueryScoping(metadata=metadata))
    await database.validate()
    async with tenant_scope(Tenant("globex")), database.session() as scoped:
        rows = await GUARD.run(scoped, "SELECT tenant_id, count(*) AS n FROM runs GROUP BY 1")
        with pytest.raises(UnsafeQuery) as refused:
            await scoped.execute(text("SELECT count(*) FROM runs"))
    assert [dict(row) for row in rows] == [{"tenant_id": "globex", "n": 50}]
    assert refused.value.reason == "raw_sql"


async def test_run_leaves_an_unfiltered_query_to_query_scoping_which_refuses_it(
    session: AsyncSession, app_engine: AsyncEngine
) -> None:
    metadata = MetaData()
    Table("runs", metadata, Column("tenant_id", Text, nullable=False), Column("id", Integer))
    database = TenantDatabase(app_engine, QueryScoping(metadata=metadata))
    await database.validate()
    schema_style = SqlGuard({"runs": None}, schema=None)  # relies on a search_path: none here
    async with tenant_scope(Tenant("acme")), database.session() as scoped:
        with pytest.raises(UnsafeQuery) as refused:
            await schema_style.run(scoped, "SELECT count(*) FROM runs")
    assert refused.value.reason == "raw_sql"
