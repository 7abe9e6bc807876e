"""The SQLAlchemy tenant store on a real PostgreSQL, read through the application role."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import (
    CachedTenantStore,
    InMemoryTenantStore,
    InvalidTenantIdentifier,
    Tenant,
    TenantNotFound,
    TenantStatus,
    TenantStoreUnavailable,
)
from asgi_tenancy.errors import TenantStoreContractError
from asgi_tenancy.sqlalchemy.store import SqlAlchemyTenantStore, create_tenants_table, tenants_table
from asgi_tenancy.store import load_tenant


class _WritableStore(SqlAlchemyTenantStore):
    """The store under test (it only reads), and the registry writes the tests need."""

    def __init__(self, engine: AsyncEngine, admin: AsyncEngine) -> None:
        super().__init__(engine)
        self._admin = admin

    async def put(self, tenant: Tenant) -> None:
        values = {"status": tenant.status.value, "attributes": dict(tenant.attributes)}
        statement = (
            insert(self.table)
            .values(id=tenant.id, **values)
            .on_conflict_do_update(
                index_elements=[self.table.c.id], set_={**values, "updated_at": func.now()}
            )
        )
        async with self._admin.begin() as conn:
            await conn.execute(statement)


@pytest.fixture
async def store(admin_engine: AsyncEngine, app_engine: AsyncEngine) -> _WritableStore:
    await create_tenants_table(admin_engine)
    async with admin_engine.begin() as conn:
        await conn.execute(text("TRUNCATE public.tenants"))
    return _WritableStore(app_engine, admin_engine)


async def test_a_tenant_put_is_read_back(store: _WritableStore) -> None:
    await store.put(Tenant("acme", attributes={"schema": "tenant_acme", "plan": "pro"}))
    tenant = await store.get("acme")
    assert tenant is not None
    assert (tenant.id, tenant.status, dict(tenant.attributes)) == (
        "acme",
        TenantStatus.ACTIVE,
        {"schema": "tenant_acme", "plan": "pro"},
    )


async def test_an_unknown_tenant_is_none(store: _WritableStore) -> None:
    assert await store.get("ghost") is None


async def test_a_suspended_tenant_loads_as_not_found(store: _WritableStore) -> None:
    await store.put(Tenant("acme"))
    await store.put(Tenant("acme", TenantStatus.SUSPENDED))
    with pytest.raises(TenantNotFound):
        await load_tenant(store, "acme")


async def test_put_updates_and_moves_updated_at(
    store: _WritableStore, admin_engine: AsyncEngine
) -> None:
    await store.put(Tenant("acme", attributes={"plan": "free"}))
    await store.put(Tenant("acme", attributes={"plan": "pro"}))
    async with admin_engine.connect() as conn:
        row = (
            await conn.execute(text("SELECT attributes, created_at, updated_at FROM tenants"))
        ).one()
    assert row.attributes == {"plan": "pro"}
    assert row.updated_at > row.created_at


async def test_ids_differing_only_in_case_are_different_tenants(
    store: _WritableStore,
) -> None:
    await store.put(Tenant("acme"))
    assert await store.get("ACME") is None


async def test_a_malformed_row_is_a_contract_error(
    store: _WritableStore, admin_engine: AsyncEngine
) -> None:
    async with admin_engine.begin() as conn:
        await conn.execute(
            text("""INSERT INTO tenants (id, attributes) VALUES ('acme', '[1, 2]')""")
        )
        await conn.execute(text("""INSERT INTO tenants (id) VALUES ('bad id')"""))
    with pytest.raises(TenantStoreContractError):
        await store.get("acme")
    with pytest.raises(InvalidTenantIdentifier):
        await store.get("bad id")  # refused before any SQL


async def test_an_unreachable_database_is_unavailable(pg_database: object) -> None:
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(TenantStoreUnavailable):
            await SqlAlchemyTenantStore(engine).get("acme")
    finally:
        await engine.dispose()


async def test_the_cache_in_front_makes_one_query_for_concurrent_misses(
    store: _WritableStore,
) -> None:
    await store.put(Tenant("acme"))
    calls: list[str] = []
    original = store.get

    async def counted(tenant_id: str) -> Tenant | None:
        calls.append(tenant_id)
        return await original(tenant_id)

    store.get = counted  # type: ignore[method-assign]
    cached = CachedTenantStore(store)
    tenants = await asyncio.gather(*(cached.get("acme") for _ in range(100)))
    assert {t.id for t in tenants if t is not None} == {"acme"}
    assert calls == ["acme"]


def test_the_table_lives_in_a_named_shared_schema() -> None:
    table = tenants_table()
    assert table.schema == "public"
    assert set(table.c.keys()) == {"id", "status", "attributes", "created_at", "updated_at"}


async def test_a_loose_tenants_table_is_held_to_the_contract(
    admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    # A legacy registry: no primary key, a CHAR id column (padded on the way out).
    async with admin_engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS public.legacy_tenants"))
        await conn.execute(
            text(
                "CREATE TABLE public.legacy_tenants (id text, status text NOT NULL DEFAULT"
                " 'active', attributes jsonb NOT NULL DEFAULT '{}')"
            )
        )
        await conn.execute(
            text("INSERT INTO public.legacy_tenants (id) VALUES ('acme'), ('acme'), ('')")
        )
        await conn.execute(text("GRANT SELECT ON public.legacy_tenants TO tenancy_app"))
        await conn.execute(text("DROP TABLE IF EXISTS public.padded_tenants"))
        await conn.execute(
            text("CREATE TABLE public.padded_tenants (LIKE public.legacy_tenants INCLUDING ALL)")
        )
        await conn.execute(text("ALTER TABLE public.padded_tenants ALTER id TYPE char(10)"))
        await conn.execute(text("INSERT INTO public.padded_tenants (id) VALUES ('globex')"))
        await conn.execute(text("GRANT SELECT ON public.padded_tenants TO tenancy_app"))
    legacy = SqlAlchemyTenantStore(app_engine, table=tenants_table(name="legacy_tenants"))
    padded = SqlAlchemyTenantStore(app_engine, table=tenants_table(name="padded_tenants"))
    with pytest.raises(TenantStoreContractError, match="more than once"):
        await legacy.get("acme")  # duplicate ids
    with pytest.raises(TenantStoreContractError, match="another id"):
        await padded.get("globex")  # 'globex    ' is not 'globex'
    with pytest.raises(InvalidTenantIdentifier):
        await legacy.get("")  # an empty id never reaches SQL
    for store in (legacy, padded):
        with pytest.raises(TenantStoreContractError):
            await load_tenant(CachedTenantStore(store), "acme" if store is legacy else "globex")


def test_an_in_memory_store_refuses_duplicate_ids() -> None:
    with pytest.raises(TenantStoreContractError):
        InMemoryTenantStore([Tenant("acme"), Tenant("acme")])
