"""Set up the demo database for one isolation strategy, idempotently (a second start reuses it)."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import InMemoryTenantStore, Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import IsolationStrategy, RowLevelSecurity, TenantDatabase

from .models import DEMO_ROWS, Base, Project, Task

APP_ROLE = "tenancy_demo_app"
APP_PASSWORD = "tenancy-demo"
TENANTS = tuple(DEMO_ROWS)


def strategy_for(isolation: str) -> IsolationStrategy:
    if isolation == "row":
        return RowLevelSecurity(metadata=Base.metadata)
    raise SystemExit(f"TENANCY_ISOLATION={isolation!r} is not supported by this example yet")


def app_url(admin_url: URL | str) -> URL:
    return make_url(admin_url).set(
        drivername="postgresql+asyncpg", username=APP_ROLE, password=APP_PASSWORD
    )


async def provision(
    admin_url: URL | str, isolation: str
) -> tuple[TenantDatabase, InMemoryTenantStore]:
    """Create the app role, tables, policies and demo rows; return the database and the store."""
    admin = create_async_engine(make_url(admin_url).set(drivername="postgresql+asyncpg"))
    strategy = strategy_for(isolation)
    try:
        await _create_role(admin)
        if isinstance(strategy, RowLevelSecurity):
            async with admin.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                await strategy.install(conn)
                await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}"))
                await conn.execute(
                    text(
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                        f"TO {APP_ROLE}"
                    )
                )
                await conn.execute(
                    text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}")
                )
    finally:
        await admin.dispose()

    store = InMemoryTenantStore(Tenant(t) for t in TENANTS)
    database = TenantDatabase(app_url(admin_url), strategy)
    await database.validate()
    await _seed(database, store)
    # The pool belongs to this event loop; the server's loop opens a fresh one.
    await database.engine.dispose()
    return database, store


async def _create_role(admin: AsyncEngine) -> None:
    async with admin.begin() as conn:
        exists = await conn.scalar(
            text("SELECT 1 FROM pg_roles WHERE rolname = :name"), {"name": APP_ROLE}
        )
        if not exists:
            await conn.execute(
                text(
                    f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS "
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
