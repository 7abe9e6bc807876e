"""``SqlGuard.run``: read only, a transaction-local timeout, a row cap, as the app role."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from asgi_tenancy import IsolationConfigError, Tenant, TenantContextError, UnsafeQuery, tenant_scope
from asgi_tenancy.sqlalchemy import QueryScoping, TenantDatabase
from asgi_tenancy.sqlguard import (
    GuardedQueryFailed,
    GuardedQueryTimeout,
    GuardedResultTooLarge,
    SqlGuard,
)

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
        with pytest.raises(GuardedQueryTimeout) as info:
            await GUARD.run(
                session,
                "SELECT count(*) FROM generate_series(1, 1000000000) g",
                timeout_ms=50,
            )
    assert info.value.status_code == 504
    assert info.value.code == "guarded_query_timeout"


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
    assert "set_config('transaction_read_only', 'on', true)" in sent[0]
    assert "set_config('statement_timeout'" in sent[0]
    assert any("runs" in statement for statement in sent)


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


async def test_the_byte_cap_stops_the_result_at_the_server(session: AsyncSession) -> None:
    async with tenant_scope(Tenant("acme")):
        rows = await GUARD.run(session, "SELECT repeat('x', 1000) AS x FROM runs", max_bytes=60_000)
        assert len(rows) == 50
        with pytest.raises(GuardedResultTooLarge) as info:
            await GUARD.run(session, "SELECT repeat('x', 1000) AS x FROM runs", max_bytes=20_000)
        assert info.value.status_code == 400
        assert info.value.code == "guarded_result_too_large"
        # one row far over the cap: built by the server, never sent
        with pytest.raises(GuardedResultTooLarge):
            await GUARD.run(session, "SELECT repeat('x', 20000000) AS x", max_bytes=1_000)
        rows = await GUARD.run(session, "SELECT id FROM runs ORDER BY id DESC", max_bytes=10_000)
    assert [row["id"] for row in rows] == list(range(50, 0, -1))


@pytest.mark.parametrize(
    ("sql", "sqlstate", "words"),
    [
        ("SELECT 1 / 0 FROM runs", "22012", "division by zero"),
        ("SELECT 'abc'::int FROM runs", "22P02", "invalid input syntax"),
        ("SELECT id FROM runs ORDER BY 5", "42P10", "ORDER BY position 5"),
    ],
)
async def test_a_query_the_server_refuses_is_a_400_with_its_message(
    session: AsyncSession, sql: str, sqlstate: str, words: str
) -> None:
    async with tenant_scope(Tenant("acme")):
        with pytest.raises(GuardedQueryFailed) as info:
            await GUARD.run(session, sql)
    assert info.value.status_code == 400
    assert info.value.code == "guarded_query_failed"
    assert info.value.sqlstate == sqlstate
    assert words in info.value.message
    assert not session.in_transaction()


async def test_columns_missing_from_the_declaration_are_read_once_from_the_catalog(
    session: AsyncSession,
) -> None:
    guard = SqlGuard({"runs": "tenant_id"})
    with tenant_scope(Tenant("acme")), pytest.raises(UnsafeQuery) as info:
        guard.rewrite("SELECT r.id FROM runs r")
    assert info.value.reason == "unknown_column"
    async with tenant_scope(Tenant("acme")):
        rows = await guard.run(session, "SELECT r.id FROM runs r WHERE r.id < 3 ORDER BY 1")
        with pytest.raises(UnsafeQuery) as again:
            await guard.run(session, "SELECT r.pg_column_size FROM runs r")
    assert [row["id"] for row in rows] == [1, 2]
    assert guard.columns == {"runs": ("tenant_id", "id")}
    assert again.value.reason == "unknown_column"


async def test_placeholders_inside_literals_stay_literals(session: AsyncSession) -> None:
    sql = (
        "SELECT '%(tenant_id)s' AS a, ':tenant_id' AS b, '$1' AS c, '%s?' AS d,"
        ' 1 AS "%(tenant_id)s" FROM runs WHERE id = 1 -- :tenant_id %(tenant_id)s'
    )
    async with tenant_scope(Tenant("acme")):
        rows = await GUARD.run(session, sql)
    assert [tuple(row.values()) for row in rows] == [
        ("%(tenant_id)s", ":tenant_id", "$1", "%s?", 1)
    ]
    assert list(rows[0].keys())[-1] == "%(tenant_id)s"


async def test_a_reader_role_that_cannot_be_set_is_a_configuration_error(
    session: AsyncSession,
) -> None:
    guard = SqlGuard({"runs": "tenant_id"}, reader_role="no_such_reader_role")
    async with tenant_scope(Tenant("acme")):
        with pytest.raises(IsolationConfigError) as info:
            await guard.run(session, "SELECT id FROM runs")
    assert info.value.hint
    assert "GRANT" in info.value.hint
