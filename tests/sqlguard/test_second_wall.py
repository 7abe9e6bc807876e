"""The second wall: ``run()``'s reader role, READ ONLY and clean-up, with the guard bypassed.

Each attack is executed through ``run()``'s own execution path with SQL the guard never saw
(``_run.execute`` given the raw text), on RLS tables (plain and signed binding), as the
application role that is neither superuser, BYPASSRLS nor owner. What it reached is read back
through an admin connection.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from asgi_tenancy.sqlguard import (
    GuardedQuery,
    GuardedQueryFailed,
    SqlGuard,
    check_reader_role,
    reader_role_ddl,
)
from asgi_tenancy.sqlguard._run import execute
from tests.conftest import APP_ROLE, PgDatabase, PgServer, create_database, drop_database

KEY = "reader-wall-signing-key-0123456789abcdef"
ACME = Tenant("acme")


def _metadata() -> MetaData:
    metadata = MetaData()
    for name in ("orders", "secrets"):
        Table(
            name,
            metadata,
            Column("tenant_id", Text, primary_key=True),
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("total", Integer),
        )
    return metadata


@dataclass(frozen=True)
class Wall:
    db: PgDatabase
    strategy: RowLevelSecurity
    guard: SqlGuard
    role: str


async def _set_up(db: PgDatabase, strategy: RowLevelSecurity, guard: SqlGuard, role: str) -> None:
    engine = create_async_engine(db.admin_url)
    async with engine.begin() as conn:
        await conn.run_sync(strategy.metadata.create_all)  # type: ignore[union-attr]
        await strategy.install(conn)
        for table in ("orders", "secrets"):
            await conn.execute(
                text(
                    f"INSERT INTO {table} SELECT t, i, i * 10 FROM"
                    " unnest(ARRAY['acme', 'globex', 'initech']) t, generate_series(1, 5) i"
                )
            )
        await conn.execute(text("CREATE SEQUENCE orders_seq"))
        await conn.execute(text("CREATE SCHEMA other"))
        await conn.execute(text("CREATE TABLE other.ledger AS SELECT id, total FROM orders"))
        await conn.execute(text(f"GRANT USAGE ON SCHEMA other TO {APP_ROLE}"))
        await conn.execute(text(f"GRANT SELECT ON other.ledger TO {APP_ROLE}"))
        for statement in reader_role_ddl(guard, role, app_role=APP_ROLE):
            await conn.execute(text(statement))
        await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{db.name}" FROM PUBLIC'))
    await engine.dispose()


async def _drop_role(server: PgServer, role: str) -> None:
    engine = create_async_engine(server.url(server.admin_url.database or "postgres"))
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    await engine.dispose()


@pytest.fixture(scope="module", params=[False, True], ids=["unsigned", "signed"])
def wall(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Wall]:
    signed: bool = request.param
    db = create_database(pg_server, f"second_wall_{'signed' if signed else 'plain'}")
    role = f"tenancy_report_{uuid.uuid4().hex[:8]}"
    strategy = RowLevelSecurity(
        metadata=_metadata(), signed=signed, signing_keys=[KEY] if signed else ()
    )
    guard = SqlGuard(
        {"orders": "tenant_id"},
        columns={"orders": ("tenant_id", "id", "total")},
        reader_role=role,
    )
    asyncio.run(_set_up(db, strategy, guard, role))
    try:
        yield Wall(db, strategy, guard, role)
    finally:
        drop_database(pg_server, db)
        asyncio.run(_drop_role(pg_server, role))


@pytest.fixture
async def database(wall: Wall) -> AsyncIterator[TenantDatabase]:
    db = TenantDatabase(wall.db.app_url, wall.strategy, engine_options={"pool_size": 2})
    await db.validate()
    yield db
    await db.dispose()


@pytest.fixture
async def admin(wall: Wall) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(wall.db.admin_url)
    yield engine
    await engine.dispose()


async def _bypassed(wall: Wall, session: AsyncSession, sql: str) -> list[dict[str, object]]:
    """``sql`` through run()'s execution path, never through the guard."""
    raw = GuardedQuery(sql, {}, text(sql), frozenset())

    async def prepare() -> tuple[GuardedQuery, bool]:
        return raw, True

    rows = await execute(
        session, prepare, role=wall.role, max_rows=100, max_bytes=100_000, timeout_ms=2_000
    )
    return [dict(row) for row in rows]


async def test_the_guarded_path_runs_as_the_reader_role(
    wall: Wall, database: TenantDatabase
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        rows = await wall.guard.run(
            session, "SELECT tenant_id, count(*) AS n FROM orders GROUP BY 1"
        )
        assert [dict(r) for r in rows] == [{"tenant_id": "acme", "n": 5}]
        assert await session.scalar(text("SELECT current_user")) == APP_ROLE  # rolled back


async def test_the_wall_alone_confines_a_query_without_a_tenant_filter(
    wall: Wall, database: TenantDatabase
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        rows = await _bypassed(
            wall, session, "SELECT tenant_id, id, current_user AS who FROM orders"
        )
    assert {row["tenant_id"] for row in rows} == {"acme"}
    assert len(rows) == 5
    assert {row["who"] for row in rows} == {wall.role}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM secrets",
        "SELECT * FROM other.ledger",
        "SELECT nextval('orders_seq')",
        "SELECT currval('orders_seq')",
        "SELECT set_config('app.tenant_id', 'globex', true)",
        "SELECT set_config('role', 'none', true)",
        f"SELECT set_config('role', '{APP_ROLE}', true)",
        "SELECT * FROM (WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d) x",
        "SELECT pg_read_file('postgresql.conf')",
    ],
)
async def test_what_the_guard_refuses_the_wall_refuses_too(
    wall: Wall, database: TenantDatabase, admin: AsyncEngine, sql: str
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        with pytest.raises(GuardedQueryFailed) as info:
            await _bypassed(wall, session, sql)
    assert info.value.sqlstate in ("42501", "25006", "0A000")
    async with admin.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM orders")) == 15


async def test_a_large_object_made_by_the_query_does_not_outlive_it(
    wall: Wall, database: TenantDatabase, admin: AsyncEngine
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        refused: str | None = None
        try:  # PostgreSQL 16 refuses it in a READ ONLY transaction, 15 makes it
            await _bypassed(wall, session, "SELECT lo_create(0) AS made")
        except GuardedQueryFailed as exc:
            refused = exc.sqlstate
    assert refused in (None, "25006")
    async with admin.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM pg_largeobject_metadata")) == 0


async def test_other_sessions_sql_is_invisible_and_their_backends_cannot_be_signalled(
    wall: Wall, database: TenantDatabase, app_engine_for: AsyncEngine
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    async with app_engine_for.connect() as other:
        pid = await other.scalar(text("SELECT pg_backend_pid()"))
        await other.execute(text(f"SELECT '{marker}'"))  # its last query, shown while idle
        probe = f"SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE '%{marker}%'"
        async with tenant_scope(ACME), database.session() as session:
            # the same probe as the application role sees it: the test can fail
            assert (await session.execute(text(probe + " AND pid <> pg_backend_pid()"))).scalar()
            await session.rollback()
            rows = await _bypassed(wall, session, probe + " AND pid <> pg_backend_pid()")
            assert rows == [{"n": 0}]
            for signal in ("pg_terminate_backend", "pg_cancel_backend"):
                with pytest.raises(GuardedQueryFailed) as info:
                    await _bypassed(wall, session, f"SELECT {signal}({pid})")
                assert info.value.sqlstate == "42501"
        assert await other.scalar(text("SELECT pg_backend_pid()")) == pid  # still alive


async def test_an_advisory_lock_left_behind_discards_the_connection(
    wall: Wall, database: TenantDatabase, admin: AsyncEngine
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        before = await session.scalar(text("SELECT pg_backend_pid()"))
        await session.rollback()
        with pytest.raises(GuardedQueryFailed, match="session state"):
            await _bypassed(wall, session, "SELECT pg_advisory_lock(4242) AS locked")
        after = await session.scalar(text("SELECT pg_backend_pid()"))
    assert after != before
    async with admin.connect() as conn:
        for _ in range(200):  # the discarded backend exits and releases its lock
            held = await conn.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242")
            )
            if not held:
                break
            await asyncio.sleep(0.025)
        assert held == 0


async def test_a_lock_taken_by_a_failing_query_is_not_kept_either(
    wall: Wall, database: TenantDatabase
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        before = await session.scalar(text("SELECT pg_backend_pid()"))
        await session.rollback()
        with pytest.raises(GuardedQueryFailed):
            await _bypassed(wall, session, "SELECT pg_advisory_lock(4343), 1 / 0")
        after = await session.scalar(text("SELECT pg_backend_pid()"))
        locks = await session.scalar(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4343")
        )
    assert after != before
    assert locks == 0 or after != before


async def test_random_is_reseeded_after_the_query(wall: Wall, database: TenantDatabase) -> None:
    async with database.engine.connect() as probe:
        await probe.execute(text("SELECT setseed(0.5)"))
        predictable = await probe.scalar(text("SELECT random()"))
    async with tenant_scope(ACME), database.session() as session:
        await _bypassed(wall, session, "SELECT setseed(0.5) AS seeded")
        assert await session.scalar(text("SELECT random()")) != predictable


async def test_nothing_of_the_query_survives_on_the_connection(
    wall: Wall, database: TenantDatabase
) -> None:
    async with tenant_scope(ACME), database.session() as session:
        await _bypassed(
            wall,
            session,
            "SELECT pg_notify('tenancy', 'x') IS NULL AS a, random() AS b",
        )
        state = (
            await session.execute(
                text(
                    "SELECT current_setting('statement_timeout') AS timeout, current_user AS who,"
                    " current_setting('transaction_read_only') AS ro,"
                    " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared"
                )
            )
        ).one()
    assert state.who == APP_ROLE
    assert state.ro == "off"
    assert state.timeout == "0"
    assert state.prepared == 0


async def test_the_audit_passes_on_the_documented_set_up_and_names_each_gap(
    wall: Wall, admin: AsyncEngine, app_engine_for: AsyncEngine
) -> None:
    async with app_engine_for.connect() as conn:
        assert await check_reader_role(conn, wall.guard, wall.role) == []
    async with admin.begin() as conn:
        await conn.execute(text(f'GRANT SELECT ON secrets TO "{wall.role}"'))
        await conn.execute(text(f'GRANT USAGE ON SEQUENCE orders_seq TO "{wall.role}"'))
        await conn.execute(
            text("GRANT EXECUTE ON FUNCTION set_config(text, text, boolean) TO PUBLIC")
        )
        await conn.execute(text(f'GRANT pg_read_all_stats TO "{wall.role}"'))
        await conn.execute(text(f'GRANT CREATE ON SCHEMA other TO "{wall.role}"'))
    try:
        async with app_engine_for.connect() as conn:
            codes = sorted(f.code for f in await check_reader_role(conn, wall.guard, wall.role))
        assert codes == ["G004", "G005", "G008", "G008", "G010"]
        async with app_engine_for.connect() as conn:
            missing = await check_reader_role(conn, wall.guard, "no_such_role")
        assert [f.code for f in missing] == ["G001"]
    finally:
        async with admin.begin() as conn:
            await conn.execute(text(f'REVOKE SELECT ON secrets FROM "{wall.role}"'))
            await conn.execute(text(f'REVOKE USAGE ON SEQUENCE orders_seq FROM "{wall.role}"'))
            await conn.execute(
                text("REVOKE EXECUTE ON FUNCTION set_config(text, text, boolean) FROM PUBLIC")
            )
            await conn.execute(text(f'REVOKE pg_read_all_stats FROM "{wall.role}"'))
            await conn.execute(text(f'REVOKE CREATE ON SCHEMA other FROM "{wall.role}"'))


@pytest.fixture
async def app_engine_for(wall: Wall) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(wall.db.app_url)
    yield engine
    await engine.dispose()
