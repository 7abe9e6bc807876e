"""RowLevelSecurity on a real PostgreSQL, as a role that is not superuser, BYPASSRLS or owner."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import (
    IsolationConfigError,
    SessionTenantMismatch,
    Tenant,
    TenantContextError,
    central_scope,
    tenant_scope,
)
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.adversarial.models import ROWS_PER_TENANT, Base, Project, Task, seed_rows
from tests.conftest import PgDatabase

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


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
async def db(rls_database: PgDatabase) -> AsyncIterator[TenantDatabase]:
    database = TenantDatabase(
        rls_database.app_url,
        _strategy(),
        engine_options={"pool_size": 1, "max_overflow": 0},
    )
    await database.validate()
    yield database
    await database.dispose()


async def _admin_count(admin: AsyncEngine, sql: str) -> int:
    async with admin.connect() as conn:
        return int(await conn.scalar(text(sql)) or 0)


async def test_reads_see_only_own_rows(db: TenantDatabase) -> None:
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(tenant), db.session() as s:
            names = (await s.scalars(select(Project.name))).all()
            raw = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
        assert len(names) == ROWS_PER_TENANT
        assert all(n.startswith(f"{tenant.id}-") for n in names)
        assert sorted(raw) == sorted(names)


async def test_the_setting_survives_commit_and_rollback(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Project)) == ROWS_PER_TENANT
        await s.commit()
        assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT
        await s.rollback()
        assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT


async def test_update_of_another_tenants_key_changes_nothing(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        result = await s.execute(
            text("UPDATE projects SET name = 'pwned' WHERE tenant_id = 'globex' AND id = 1")
        )
        await s.commit()
    assert result.rowcount == 0  # type: ignore[attr-defined]
    assert (
        await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE name = 'pwned'") == 0
    )


async def test_forged_insert_is_rejected(db: TenantDatabase, admin_engine: AsyncEngine) -> None:
    async with tenant_scope(ACME), db.session() as s:
        s.add(Project(tenant_id="globex", id=99, name="forged"))
        with pytest.raises(TenantContextError):
            await s.flush()
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(DBAPIError, match="row-level security"):
            await s.execute(
                text("INSERT INTO projects (tenant_id, id, name) VALUES ('globex', 98, 'forged')")
            )
    assert await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE id >= 98") == 0


async def test_inserts_are_stamped(db: TenantDatabase, admin_engine: AsyncEngine) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        s.add(Project(id=500, name="stamped"))
        await s.commit()
    async with admin_engine.connect() as conn:
        owner = await conn.scalar(text("SELECT tenant_id FROM projects WHERE id = 500"))
    assert owner == "globex"


async def test_tenant_column_cannot_change(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        project = await s.get(Project, ("acme", 2))
        assert project is not None
        project.tenant_id = "globex"
        with pytest.raises(TenantContextError):
            await s.flush()


async def test_no_context_raises_before_any_connection(db: TenantDatabase) -> None:
    with pytest.raises(TenantContextError):
        async with db.session():
            pass  # pragma: no cover
    assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with central_scope(reason="test"), pytest.raises(TenantContextError):
        async with db.session():
            pass  # pragma: no cover


async def test_session_used_in_another_scope_or_after_its_own_raises(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.get(Project, ("acme", 1))
        leaked = s

        async def other() -> None:
            async with tenant_scope(GLOBEX):
                with pytest.raises(SessionTenantMismatch):
                    await leaked.get(Project, ("acme", 1))
                with pytest.raises(SessionTenantMismatch):
                    await leaked.execute(select(Project))

        await asyncio.create_task(other(), context=contextvars.Context())
    with pytest.raises(SessionTenantMismatch):
        await leaked.execute(select(Project))


async def test_pool_reuse_leaves_nothing_behind(db: TenantDatabase) -> None:
    pids = []
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(tenant), db.session() as s:
            pids.append(await s.scalar(text("SELECT pg_backend_pid()")))
            assert await s.scalar(text("SELECT current_setting('app.tenant_id')")) == tenant.id
    async with db.engine.connect() as conn:
        pids.append(await conn.scalar(text("SELECT pg_backend_pid()")))
        assert await conn.scalar(text("SELECT current_setting('app.tenant_id', true)")) == ""
        with pytest.raises(DBAPIError, match="no tenant is bound"):
            await conn.scalar(text("SELECT count(*) FROM projects"))
    assert len(set(pids)) == 1  # one backend served all three


async def test_validate_refuses_a_superuser(rls_database: PgDatabase) -> None:
    database = TenantDatabase(rls_database.admin_url, _strategy())
    with pytest.raises(IsolationConfigError, match="R001"):
        await database.validate()
    with tenant_scope(ACME), pytest.raises(IsolationConfigError):
        async with database.session():
            pass  # pragma: no cover
    await database.dispose()


async def test_relationship_loads_stay_in_tenant(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        project = await s.get(Project, ("acme", 1))
        assert project is not None
        tasks = await s.run_sync(lambda _: list(project.tasks))
        assert tasks
        assert all(t.title.startswith("acme-") for t in tasks)
        bulk = await s.execute(update(Task).values(title="bulk"))
        await s.rollback()
    assert bulk.rowcount == ROWS_PER_TENANT  # type: ignore[attr-defined]
