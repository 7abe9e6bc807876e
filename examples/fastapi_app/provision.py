"""Set up the demo database for one isolation strategy, idempotently (a second start reuses it).

- row: shared tables in ``public`` with RLS policies; query: the same tables, no policies;
- schema: one schema per tenant (``tenant_acme``, ``tenant_globex``), the shared schema empty;
- database: one database per tenant (``<database>_acme``), each reached by a login role of
  its own whose URL is the tenant's ``database_url`` attribute.

Everything runs as the superuser given; the app connects as ``tenancy_demo_app`` (or the
tenant's role), which is neither superuser nor owner of any table.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from asgi_tenancy import InMemoryTenantStore, Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import (
    IsolationStrategy,
    RowLevelSecurity,
    SchemaPerTenant,
    TenantDatabase,
    strategy_from_env,
)

from .models import DEMO_ROWS, Base, Project, Task

APP_ROLE = "tenancy_demo_app"
APP_PASSWORD = "tenancy-demo"
TENANTS = tuple(DEMO_ROWS)


def strategy_for(isolation: str) -> IsolationStrategy:
    """The strategy for ``isolation`` (row, schema, database or query)."""
    return strategy_from_env(
        metadata=Base.metadata,
        environ={"TENANCY_ISOLATION": isolation},
        # small caps: two tenants; a third engine would mean a placement bug
        options={"database": {"max_engines": 4, "max_connections": 8}},
    )


def app_url(admin_url: URL | str) -> URL:
    return make_url(admin_url).set(
        drivername="postgresql+asyncpg", username=APP_ROLE, password=APP_PASSWORD
    )


def tenant_database(admin_url: URL | str, tenant_id: str) -> str:
    """The name of a tenant's own database under database isolation."""
    return f"{make_url(admin_url).database or 'postgres'}_{tenant_id}"


def tenant_role(tenant_id: str) -> str:
    return f"tenancy_demo_{tenant_id}"


def _tenant_url(admin_url: URL | str, tenant_id: str) -> str:
    url = make_url(admin_url).set(
        drivername="postgresql+asyncpg",
        username=tenant_role(tenant_id),
        password=APP_PASSWORD,
        database=tenant_database(admin_url, tenant_id),
    )
    return url.render_as_string(hide_password=False)


def open_database(
    admin_url: URL | str, isolation: str
) -> tuple[TenantDatabase, InMemoryTenantStore]:
    """A fresh, unvalidated database and the demo tenants; no I/O (the app validates)."""
    attributes: Mapping[str, Mapping[str, str]] = {t: {} for t in TENANTS}
    if isolation == "database":
        attributes = {t: {"database_url": _tenant_url(admin_url, t)} for t in TENANTS}
    store = InMemoryTenantStore(Tenant(t, attributes=attributes[t]) for t in TENANTS)
    return TenantDatabase(app_url(admin_url), strategy_for(isolation)), store


async def provision(
    admin_url: URL | str, isolation: str
) -> tuple[TenantDatabase, InMemoryTenantStore]:
    """Create roles, tables, policies or schemas and the demo rows; return a fresh database.

    The database used for seeding is disposed here: its pools belong to this event loop, and
    the server's loop must open its own.
    """
    database, store = open_database(admin_url, isolation)
    admin = create_async_engine(make_url(admin_url).set(drivername="postgresql+asyncpg"))
    try:
        await _create_role(admin, APP_ROLE)
        if isolation == "database":
            await _provision_databases(admin, admin_url)
        else:
            async with admin.begin() as conn:
                await _provision_shared(conn, database.strategy)
    finally:
        await admin.dispose()
    try:
        await database.validate()
        await _seed(database, store)
    finally:
        await database.dispose()
    return open_database(admin_url, isolation)


async def _provision_shared(conn: AsyncConnection, strategy: IsolationStrategy) -> None:
    """Row, query and schema isolation: one database, the app role on DML only."""
    # Serialise concurrent first starts (two test workers, two processes on one folder).
    await conn.execute(text("SELECT pg_advisory_xact_lock(7262)"))
    # R018, S005: temporary tables outlive a transaction and could shadow a tenant table.
    database = await conn.scalar(text("SELECT current_database()"))
    await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC, {APP_ROLE}'))
    if isinstance(strategy, SchemaPerTenant):
        await strategy.create_shared_schema(conn, APP_ROLE)
        for tenant_id in TENANTS:
            await strategy.create_tenant_schema(conn, Tenant(tenant_id), APP_ROLE)
        return
    await conn.run_sync(Base.metadata.create_all)
    if isinstance(strategy, RowLevelSecurity):
        await strategy.install(conn)
    await _grant_dml(conn, APP_ROLE)


async def _provision_databases(admin: AsyncEngine, admin_url: URL | str) -> None:
    """Database isolation: a database and a login role per tenant, DML grants only."""
    autocommit = admin.execution_options(isolation_level="AUTOCOMMIT")
    for tenant_id in TENANTS:
        name, role = tenant_database(admin_url, tenant_id), tenant_role(tenant_id)
        await _create_role(admin, role)
        async with autocommit.connect() as conn:
            exists = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            )
            if not exists:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
            await conn.execute(text(f'REVOKE CONNECT ON DATABASE "{name}" FROM PUBLIC'))
            await conn.execute(text(f'GRANT CONNECT ON DATABASE "{name}" TO {role}'))
        tenant_admin = create_async_engine(
            make_url(admin_url).set(drivername="postgresql+asyncpg", database=name)
        )
        try:
            async with tenant_admin.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                await _grant_dml(conn, role)
        finally:
            await tenant_admin.dispose()


async def _grant_dml(conn: AsyncConnection, role: str) -> None:
    await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
    await conn.execute(
        text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    )
    await conn.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"))


async def _create_role(admin: AsyncEngine, role: str) -> None:
    async with admin.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(7261)"))
        exists = await conn.scalar(
            text("SELECT 1 FROM pg_roles WHERE rolname = :name"), {"name": role}
        )
        if not exists:
            await conn.execute(
                text(
                    f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
                    f"PASSWORD '{APP_PASSWORD}'"
                )
            )


async def _seed(database: TenantDatabase, store: InMemoryTenantStore) -> None:
    """The same project and task ids in every tenant: a leak would show at once."""
    for tenant_id, (projects, tasks) in DEMO_ROWS.items():
        tenant = await store.get(tenant_id)
        assert tenant is not None
        async with tenant_scope(tenant), database.session() as session:
            if await session.scalar(select(Project.id).limit(1)) is not None:
                continue  # seeded by an earlier start
            for pid, name in enumerate(projects, start=1):
                session.add(Project(id=pid, name=name))
            await session.flush()
            for tid, title in enumerate(tasks, start=1):
                session.add(Task(id=tid, project_id=1, title=title))
            await session.commit()
