"""TenantProvisioner on a real PostgreSQL: what each strategy creates, undoes and removes.

Everything is read back through the admin connection (catalogue, privileges, the registry
row); isolation of freshly created tenants is proved as the application role, which is
neither superuser nor BYPASSRLS and owns nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import (
    CachedTenantStore,
    InvalidTenantIdentifier,
    IsolationConfigError,
    TenantNotFound,
    TenantStatus,
    tenant_scope,
)
from asgi_tenancy.errors import (
    ConfirmationRequired,
    TenantExists,
    TenantMigrating,
    TenantPlacementError,
)
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    QueryScoping,
    RowLevelSecurity,
    SchemaPerTenant,
    SqlAlchemyTenantStore,
    TenantDatabase,
)
from asgi_tenancy.sqlalchemy.strategy import IsolationStrategy
from tests.conftest import APP_ROLE, PgDatabase
from tests.lifecycle.conftest import RUN, Provision, metadata, notes

# A table whose DDL PostgreSQL refuses: onboarding fails after the first table was created.
broken = MetaData()
Table("aa_fine", broken, Column("id", Integer, primary_key=True))
Table("zz_broken", broken, Column("id", Integer, server_default=text("no_such_function()")))


def _id() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _schemas(**options: Any) -> SchemaPerTenant:
    return SchemaPerTenant(metadata=metadata, naming=f"{RUN}_{{id}}", **options)


async def _scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(text(sql), params)


async def _row(engine: AsyncEngine, tenant_id: str) -> Any:
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT status, attributes FROM public.tenants WHERE id = :id"), {"id": tenant_id}
        )
        return result.first()


async def _schema_exists(engine: AsyncEngine, name: str) -> bool:
    found = await _scalar(engine, "SELECT 1 FROM pg_namespace WHERE nspname = :n", n=name)
    return found is not None


async def _role_exists(engine: AsyncEngine, name: str) -> bool:
    return await _scalar(engine, "SELECT 1 FROM pg_roles WHERE rolname = :n", n=name) is not None


async def _database_exists(engine: AsyncEngine, name: str) -> bool:
    found = await _scalar(engine, "SELECT 1 FROM pg_database WHERE datname = :n", n=name)
    return found is not None


@pytest.fixture
async def database_admin(lifecycle_database: PgDatabase) -> AsyncIterator[Any]:
    """``open(name)``: an admin engine on a tenant database, disposed at the end."""
    engines: list[AsyncEngine] = []

    def open_(name: str) -> AsyncEngine:
        engine = create_async_engine(make_url(lifecycle_database.admin_url).set(database=name))
        engines.append(engine)
        return engine

    yield open_
    for engine in engines:
        await engine.dispose()


# -- every strategy ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["row", "query"])
async def test_row_level_tenant_is_a_registry_row_only(
    provision: Provision, lifecycle_admin: AsyncEngine, kind: str
) -> None:
    strategy = RowLevelSecurity() if kind == "row" else QueryScoping(metadata=MetaData())
    count = "SELECT count(*) FROM pg_namespace"
    schemas_before = await _scalar(lifecycle_admin, count)
    tenant = await provision(strategy).create_tenant(_id(), {"plan": "pro"})
    assert tenant.is_active
    assert tuple(await _row(lifecycle_admin, tenant.id)) == ("active", {"plan": "pro"})
    assert await _scalar(lifecycle_admin, count) == schemas_before
    await provision(strategy).drop_tenant(tenant.id, confirm=True)
    assert await _row(lifecycle_admin, tenant.id) is None


async def test_existing_id_raises_tenant_exists_and_keeps_the_tenant(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    provisioner = provision(_schemas())
    tenant = await provisioner.create_tenant(_id(), {"plan": "pro"})
    schema = f"{RUN}_{tenant.id}"
    async with lifecycle_admin.begin() as conn:
        await conn.execute(text(f"INSERT INTO \"{schema}\".notes VALUES (1, 'kept')"))
    with pytest.raises(TenantExists):
        await provisioner.create_tenant(tenant.id, {"plan": "free"})
    assert tuple(await _row(lifecycle_admin, tenant.id)) == (
        "active",
        {"plan": "pro", "schema": schema},
    )
    assert await _scalar(lifecycle_admin, f'SELECT body FROM "{schema}".notes') == "kept"


@pytest.mark.parametrize("bad", ["", "a b", "../x", "x" * 64, "tenant\n", "-lead"])
async def test_invalid_ids_are_refused_before_any_sql(
    provision: Provision, lifecycle_admin: AsyncEngine, bad: str
) -> None:
    provisioner = provision(RowLevelSecurity())
    count = await _scalar(lifecycle_admin, "SELECT count(*) FROM public.tenants")
    for operation in (
        provisioner.create_tenant(bad),
        provisioner.suspend(bad),
        provisioner.activate(bad),
        provisioner.drop_tenant(bad, confirm=True),
    ):
        with pytest.raises(InvalidTenantIdentifier):
            await operation
    assert await _scalar(lifecycle_admin, "SELECT count(*) FROM public.tenants") == count


@pytest.mark.parametrize("kind", ["row", "schema", "database"])
async def test_unknown_tenants_raise_not_found(provision: Provision, kind: str) -> None:
    makers: dict[str, Callable[[], IsolationStrategy]] = {
        "row": RowLevelSecurity,
        "schema": _schemas,
        "database": DatabasePerTenant,
    }
    provisioner = provision(makers[kind]())
    unknown = _id()
    with pytest.raises(TenantNotFound):
        await provisioner.suspend(unknown)
    with pytest.raises(TenantNotFound):
        await provisioner.activate(unknown)
    with pytest.raises(TenantNotFound):
        await provisioner.drop_tenant(unknown, confirm=True)
    assert await provisioner.get(unknown) is None


async def test_drop_refuses_without_confirmation(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    provisioner = provision(_schemas())
    tenant = await provisioner.create_tenant(_id())
    for confirm in (False, 1, "yes"):
        with pytest.raises(ConfirmationRequired) as caught:
            await provisioner.drop_tenant(tenant.id, confirm=confirm)  # type: ignore[arg-type]
        assert caught.value.code == "confirmation_required"
    assert await _row(lifecycle_admin, tenant.id) is not None
    assert await _schema_exists(lifecycle_admin, f"{RUN}_{tenant.id}")


async def test_suspend_and_activate_reach_the_store_after_invalidate(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    provisioner = provision(RowLevelSecurity())
    tenant = await provisioner.create_tenant(_id())
    cached = CachedTenantStore(SqlAlchemyTenantStore(lifecycle_admin), ttl=3600)
    assert (await cached.get(tenant.id)) == tenant

    suspended = await provisioner.suspend(tenant.id)
    assert suspended.status is TenantStatus.SUSPENDED
    assert (await _row(lifecycle_admin, tenant.id)).status == "suspended"
    assert await provisioner.suspend(tenant.id) == suspended  # idempotent
    stale = await cached.get(tenant.id)
    assert stale is not None
    assert stale.is_active
    cached.invalidate(tenant.id)
    fresh = await cached.get(tenant.id)
    assert fresh is not None
    assert fresh.status is TenantStatus.SUSPENDED

    assert (await provisioner.activate(tenant.id)).is_active
    assert (await _row(lifecycle_admin, tenant.id)).status == "active"
    assert await provisioner.list_tenants() == sorted(
        await provisioner.list_tenants(), key=lambda t: t.id
    )
    assert tenant.id in {t.id for t in await provisioner.list_tenants()}


# -- schema per tenant ---------------------------------------------------------------------


async def test_schema_tenant_gets_schema_tables_and_dml_grants_only(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    tenant = await provision(_schemas()).create_tenant(_id())
    schema = f"{RUN}_{tenant.id}"
    assert tenant.attributes == {"schema": schema}
    assert tuple(await _row(lifecycle_admin, tenant.id)) == ("active", {"schema": schema})
    note = await _scalar(
        lifecycle_admin,
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :n",
        n=schema,
    )
    assert note == f"asgi-tenancy tenant {tenant.id}"
    table = f'"{schema}".notes'
    for privilege, granted in (("SELECT", True), ("DELETE", True), ("TRUNCATE", False)):
        assert (
            await _scalar(
                lifecycle_admin,
                "SELECT has_table_privilege(:r, :t, :p)",
                r=APP_ROLE,
                t=table,
                p=privilege,
            )
            is granted
        )
    owner = await _scalar(
        lifecycle_admin, "SELECT tableowner FROM pg_tables WHERE schemaname = :s", s=schema
    )
    assert owner != APP_ROLE


async def test_fresh_schema_tenants_are_isolated(
    provision: Provision, lifecycle_admin: AsyncEngine, lifecycle_database: PgDatabase
) -> None:
    strategy = _schemas()
    provisioner = provision(strategy)
    a, b = await provisioner.create_tenant(_id()), await provisioner.create_tenant(_id())
    async with lifecycle_admin.begin() as conn:
        for tenant in (a, b):
            rows = [{"id": 1, "body": f"{tenant.id}-1"}, {"id": 2, "body": f"{tenant.id}-2"}]
            await conn.execute(
                insert(notes.to_metadata(MetaData(), schema=f"{RUN}_{tenant.id}")), rows
            )
    database = TenantDatabase(lifecycle_database.app_url, _schemas())
    await database.validate()
    try:
        for me, other in ((a, b), (b, a)):
            with tenant_scope(me):
                async with database.session() as session:
                    bodies = set(await session.scalars(select(notes.c.body)))
                    await session.execute(insert(notes).values(id=3, body=f"{me.id}-3"))
                    await session.commit()
            assert bodies == {f"{me.id}-1", f"{me.id}-2"}
            assert not any(other.id in body for body in bodies)
        for tenant in (a, b):
            got = await _scalar(
                lifecycle_admin,
                f"SELECT string_agg(body, ',' ORDER BY id) FROM \"{RUN}_{tenant.id}\".notes",
            )
            assert got == f"{tenant.id}-1,{tenant.id}-2,{tenant.id}-3"
    finally:
        await database.dispose()


async def test_schema_drop_removes_schema_role_and_row(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    provisioner = provision(_schemas(per_tenant_roles=True))
    tenant = await provisioner.create_tenant(_id())
    name = f"{RUN}_{tenant.id}"
    assert await _schema_exists(lifecycle_admin, name)
    assert await _scalar(
        lifecycle_admin, "SELECT pg_has_role(:a, :r, 'MEMBER')", a=APP_ROLE, r=name
    )
    assert await _scalar(
        lifecycle_admin, "SELECT has_table_privilege(:r, :t, 'SELECT')", r=name, t=f'"{name}".notes'
    )
    await provisioner.drop_tenant(tenant.id, confirm=True)
    assert not await _schema_exists(lifecycle_admin, name)
    assert not await _role_exists(lifecycle_admin, name)
    assert await _row(lifecycle_admin, tenant.id) is None


async def test_failed_schema_onboarding_leaves_nothing(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    strategy = SchemaPerTenant(metadata=broken, naming=f"{RUN}_{{id}}", per_tenant_roles=True)
    tenant_id = _id()
    with pytest.raises(ProgrammingError, match="no_such_function"):
        await provision(strategy).create_tenant(tenant_id)
    name = f"{RUN}_{tenant_id}"
    assert not await _schema_exists(lifecycle_admin, name)
    assert not await _role_exists(lifecycle_admin, name)
    assert await _row(lifecycle_admin, tenant_id) is None


async def test_schema_or_role_already_there_is_refused_and_left_alone(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    tenant_id = _id()
    name = f"{RUN}_{tenant_id}"
    async with lifecycle_admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{name}"'))
        await conn.execute(text(f'CREATE TABLE "{name}".keep (id int)'))
    with pytest.raises(TenantExists):
        await provision(_schemas()).create_tenant(tenant_id)
    assert await _row(lifecycle_admin, tenant_id) is None
    assert await _scalar(lifecycle_admin, "SELECT to_regclass(:t)::text", t=f'"{name}".keep')

    other = _id()
    async with lifecycle_admin.begin() as conn:
        await conn.execute(text(f'CREATE ROLE "{RUN}_{other}" NOLOGIN'))
    with pytest.raises(TenantExists):
        await provision(_schemas(per_tenant_roles=True)).create_tenant(other)
    assert not await _schema_exists(lifecycle_admin, f"{RUN}_{other}")
    assert await _role_exists(lifecycle_admin, f"{RUN}_{other}")


async def test_drop_refuses_a_schema_made_for_someone_else(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    """A registry row pointing at a foreign schema (tampered, or a typo) drops nothing."""
    provisioner = provision(_schemas())
    victim = await provisioner.create_tenant(_id())
    tenant = await provisioner.create_tenant(_id())
    async with lifecycle_admin.begin() as conn:
        await conn.execute(
            text("UPDATE public.tenants SET attributes = :a WHERE id = :id"),
            {"a": f'{{"schema": "{RUN}_{victim.id}"}}', "id": tenant.id},
        )
    with pytest.raises(IsolationConfigError):
        await provisioner.drop_tenant(tenant.id, confirm=True)
    assert await _schema_exists(lifecycle_admin, f"{RUN}_{victim.id}")
    assert await _schema_exists(lifecycle_admin, f"{RUN}_{tenant.id}")
    assert await _row(lifecycle_admin, tenant.id) is not None


async def test_unusable_schema_name_is_refused_before_any_sql(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    count = await _scalar(lifecycle_admin, "SELECT count(*) FROM public.tenants")
    for tenant_id, attributes in (("Upper-Case", None), (_id(), {"schema": "public"})):
        with pytest.raises(TenantPlacementError):
            await provision(_schemas()).create_tenant(tenant_id, attributes)
    assert await _scalar(lifecycle_admin, "SELECT count(*) FROM public.tenants") == count


# -- database per tenant -------------------------------------------------------------------


async def test_database_tenant_gets_database_connect_grant_and_tables(
    provision: Provision,
    lifecycle_admin: AsyncEngine,
    lifecycle_database: PgDatabase,
    database_admin: Any,
) -> None:
    tenant = await provision(DatabasePerTenant(), metadata=metadata).create_tenant(_id())
    name = f"{RUN}_{tenant.id}"
    assert tenant.attributes["database"] == name
    status, attributes = await _row(lifecycle_admin, tenant.id)
    assert status == "active"
    assert (
        attributes["database_url"].endswith(f"/{name}") or f"/{name}?" in attributes["database_url"]
    )
    assert await _database_exists(lifecycle_admin, name)
    assert await _scalar(
        lifecycle_admin, "SELECT has_database_privilege(:r, :d, 'CONNECT')", r=APP_ROLE, d=name
    )
    public_acl = await _scalar(
        lifecycle_admin,
        "SELECT count(*) FROM pg_database, aclexplode(datacl) a"
        " WHERE datname = :d AND a.grantee = 0",
        d=name,
    )
    assert public_acl == 0  # PUBLIC may neither connect nor create temporary tables
    inside = database_admin(name)
    for privilege, granted in (("SELECT", True), ("UPDATE", True), ("TRUNCATE", False)):
        assert (
            await _scalar(
                inside,
                "SELECT has_table_privilege(:r, 'public.notes', :p)",
                r=APP_ROLE,
                p=privilege,
            )
            is granted
        )
    assert (
        await _scalar(inside, "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'")
        != APP_ROLE
    )
    assert not await _scalar(
        inside, "SELECT has_schema_privilege(:r, 'public', 'CREATE')", r=APP_ROLE
    )


async def test_fresh_database_tenants_are_isolated(
    provision: Provision, lifecycle_database: PgDatabase, database_admin: Any
) -> None:
    provisioner = provision(DatabasePerTenant(), metadata=metadata)
    a, b = await provisioner.create_tenant(_id()), await provisioner.create_tenant(_id())
    for tenant in (a, b):
        async with database_admin(f"{RUN}_{tenant.id}").begin() as conn:
            await conn.execute(insert(notes), [{"id": 1, "body": f"{tenant.id}-1"}])
    database = TenantDatabase(lifecycle_database.app_url, DatabasePerTenant())
    await database.validate()
    try:
        for me in (a, b):
            stored = await provisioner.get(me.id)
            assert stored is not None
            with tenant_scope(stored):
                async with database.session() as session:
                    assert list(await session.scalars(select(notes.c.body))) == [f"{me.id}-1"]
                    await session.execute(insert(notes).values(id=2, body=f"{me.id}-2"))
                    await session.commit()
        for tenant in (a, b):
            bodies = await _scalar(
                database_admin(f"{RUN}_{tenant.id}"),
                "SELECT string_agg(body, ',' ORDER BY id) FROM notes",
            )
            assert bodies == f"{tenant.id}-1,{tenant.id}-2"
    finally:
        await database.dispose()


async def test_failed_database_onboarding_removes_database_and_row(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    tenant_id = _id()
    with pytest.raises(ProgrammingError, match="no_such_function") as caught:
        await provision(DatabasePerTenant(), metadata=broken).create_tenant(tenant_id)
    assert not getattr(caught.value, "__notes__", None)  # the clean-up itself went well
    assert not await _database_exists(lifecycle_admin, f"{RUN}_{tenant_id}")
    assert await _row(lifecycle_admin, tenant_id) is None


async def test_database_already_there_is_refused_and_left_alone(
    provision: Provision, lifecycle_admin: AsyncEngine, database_admin: Any
) -> None:
    tenant_id = _id()
    name = f"{RUN}_{tenant_id}"
    autocommit = lifecycle_admin.execution_options(isolation_level="AUTOCOMMIT")
    async with autocommit.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    async with database_admin(name).begin() as conn:
        await conn.execute(text("CREATE TABLE keep (id int)"))
    with pytest.raises(TenantExists):
        await provision(DatabasePerTenant(), metadata=metadata).create_tenant(tenant_id)
    assert await _row(lifecycle_admin, tenant_id) is None
    assert await _scalar(database_admin(name), "SELECT to_regclass('keep')::text") == "keep"
    # Not created by the provisioner: dropping a tenant that points at it is refused too.
    async with lifecycle_admin.begin() as conn:
        await conn.execute(
            text("INSERT INTO public.tenants (id, attributes) VALUES (:id, :a)"),
            {"id": tenant_id, "a": '{"database_url": "postgresql+asyncpg:///x"}'},
        )
    with pytest.raises(IsolationConfigError):
        await provision(
            DatabasePerTenant(url_for=lambda t: lifecycle_admin.url.set(database=name))
        ).drop_tenant(tenant_id, confirm=True)
    assert await _database_exists(lifecycle_admin, name)


async def test_existing_database_tenant_id_keeps_its_database(
    provision: Provision, lifecycle_admin: AsyncEngine, database_admin: Any
) -> None:
    provisioner = provision(DatabasePerTenant(), metadata=metadata)
    tenant = await provisioner.create_tenant(_id())
    name = f"{RUN}_{tenant.id}"
    async with database_admin(name).begin() as conn:
        await conn.execute(insert(notes).values(id=1, body="kept"))
    with pytest.raises(TenantExists):
        await provisioner.create_tenant(tenant.id)
    assert (await _row(lifecycle_admin, tenant.id)).status == "active"
    assert await _scalar(database_admin(name), "SELECT body FROM notes") == "kept"


async def test_drop_database_tenant_removes_database_and_row(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    provisioner = provision(DatabasePerTenant(), metadata=metadata)
    tenant = await provisioner.create_tenant(_id())
    name = f"{RUN}_{tenant.id}"
    assert await _database_exists(lifecycle_admin, name)
    await provisioner.drop_tenant(tenant.id, confirm=True)
    assert not await _database_exists(lifecycle_admin, name)
    assert await _row(lifecycle_admin, tenant.id) is None


async def test_database_tenant_needs_a_url_and_the_admins_server(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    tenant_id = _id()
    with pytest.raises(IsolationConfigError, match="app_url"):
        await provision(DatabasePerTenant(), app_url=None).create_tenant(tenant_id)
    elsewhere = "postgresql+asyncpg://app:pw@db.elsewhere.invalid:5432/x"
    with pytest.raises(IsolationConfigError, match="another server"):
        await provision(DatabasePerTenant(), app_url=elsewhere).create_tenant(tenant_id)
    assert await _row(lifecycle_admin, tenant_id) is None
    assert not await _database_exists(lifecycle_admin, f"{RUN}_{tenant_id}")


def test_configuration_is_checked_at_construction(provision: Provision) -> None:
    with pytest.raises(IsolationConfigError):
        provision(_schemas(), metadata=MetaData())  # SchemaPerTenant brings its own
    with pytest.raises(IsolationConfigError):
        provision(DatabasePerTenant(), database_naming="fixed")


async def test_activate_leaves_a_migrating_tenant_to_its_migration(
    provision: Provision, lifecycle_admin: AsyncEngine
) -> None:
    provisioner = provision(RowLevelSecurity())
    tenant = await provisioner.create_tenant(_id())
    async with lifecycle_admin.begin() as conn:
        await conn.execute(
            text("UPDATE public.tenants SET status = 'migrating' WHERE id = :id"), {"id": tenant.id}
        )
    with pytest.raises(TenantMigrating):
        await provisioner.activate(tenant.id)  # would lift the 503 mid-migration
    assert (await _row(lifecycle_admin, tenant.id)).status == "migrating"
    assert (await provisioner.suspend(tenant.id)).status is TenantStatus.SUSPENDED
    assert (await _row(lifecycle_admin, tenant.id)).status == "suspended"
