"""SchemaPerTenant on Citus schema-based sharding: ``create_tenant_schema`` of a
``citus=True`` strategy makes each tenant schema a distributed schema (its own shard group on
one worker), on any admin connection; the app role's transaction-local ``search_path`` reaches
it there. Two tenants with the same table names and keys, read back through the admin.
Provisioning, migrations and moves: ``test_schema_provisioning.py``, ``test_schema_migrations.py``,
``test_schema_move.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import MetaData, Text, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_tenancy import IsolationConfigError, Tenant, TenantContextError, tenant_scope
from asgi_tenancy.sqlalchemy import SchemaPerTenant, TenantDatabase
from tests.citus.conftest import Cluster

pytestmark = pytest.mark.citus

SCHEMA_TENANTS = ("acme", "globex")
ROWS = 10


class Base(DeclarativeBase):
    metadata = MetaData()


class Note(Base):
    __tablename__ = "citus_notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(Text)


def strategy() -> SchemaPerTenant:
    return SchemaPerTenant(
        metadata=Base.metadata, naming="citus_tenant_{id}", shared_schema=None, citus=True
    )


async def bodies(admin: AsyncEngine, tenant: str) -> dict[int, str]:
    async with admin.connect() as conn:
        rows = await conn.execute(text(f"SELECT id, body FROM citus_tenant_{tenant}.citus_notes"))
        return dict(rows.all())


@pytest.fixture
async def schemas(cluster: Cluster, admin: AsyncEngine) -> AsyncIterator[SchemaPerTenant]:
    made = strategy()
    drop = [f"DROP SCHEMA IF EXISTS citus_tenant_{t} CASCADE" for t in SCHEMA_TENANTS]
    async with admin.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for statement in drop:
            await auto.execute(text(statement))
        for tenant in SCHEMA_TENANTS:
            await made.create_tenant_schema(auto, Tenant(tenant), cluster.app_role)
            await auto.execute(
                text(
                    f"INSERT INTO citus_tenant_{tenant}.citus_notes"
                    " SELECT g, CAST(:t AS text) || '-note-' || g FROM generate_series(1, :n) g"
                ),
                {"t": tenant, "n": ROWS},
            )
    yield made
    async with admin.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for statement in drop:
            await auto.execute(text(statement))


async def test_tenant_schemas_are_distributed_each_its_own_shard_group(
    admin: AsyncEngine, schemas: SchemaPerTenant
) -> None:
    async with admin.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT schema_name::text, colocation_id FROM citus_schemas"
                    " WHERE schema_name::text LIKE 'citus\\_tenant\\_%'"
                )
            )
        ).all()
    groups = dict((name, group) for name, group in rows)
    assert set(groups) == {f"citus_tenant_{t}" for t in SCHEMA_TENANTS}
    assert len(set(groups.values())) == len(SCHEMA_TENANTS)


@pytest.mark.parametrize(("me", "other"), [("acme", "globex"), ("globex", "acme")])
async def test_each_tenant_reads_and_writes_only_its_schema_on_the_cluster(
    cluster: Cluster, admin: AsyncEngine, schemas: SchemaPerTenant, me: str, other: str
) -> None:
    db = TenantDatabase(cluster.app_url, schemas)
    await db.validate()
    before = await bodies(admin, other)
    try:
        async with tenant_scope(Tenant(me)), db.session() as s:
            orm = {n.id: n.body for n in (await s.execute(select(Note))).scalars()}
            raw = dict((await s.execute(text("SELECT id, body FROM citus_notes"))).all())
            await s.execute(update(Note).values(body="overwritten"))
            await s.commit()
        with pytest.raises(TenantContextError):
            async with db.session():
                pass
    finally:
        await db.dispose()
    expected = {i: f"{me}-note-{i}" for i in range(1, ROWS + 1)}
    assert orm == raw == expected
    assert set((await bodies(admin, me)).values()) == {"overwritten"}
    assert await bodies(admin, other) == before


@pytest.fixture
async def role_schemas(cluster: Cluster, admin: AsyncEngine) -> AsyncIterator[SchemaPerTenant]:
    """The same schemas with per-tenant roles (NOLOGIN, as the strategy creates them), made
    distributed by the setting (``citus=True`` refuses per-tenant roles); the app role
    NOINHERIT meanwhile, as PostgreSQL 15 needs (S007)."""
    made = SchemaPerTenant(
        metadata=Base.metadata,
        naming="citus_tenant_{id}",
        shared_schema=None,
        per_tenant_roles=True,
    )
    names = [f"citus_tenant_{t}" for t in SCHEMA_TENANTS]
    async with admin.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for name in names:
            await auto.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            await auto.execute(text(f"DROP ROLE IF EXISTS {name}"))
        await auto.execute(text(f"ALTER ROLE {cluster.app_role} NOINHERIT"))
        await auto.execute(text("SET citus.enable_schema_based_sharding = on"))
        for tenant in SCHEMA_TENANTS:
            await made.create_tenant_schema(auto, Tenant(tenant), cluster.app_role)
            await auto.execute(
                text(f"INSERT INTO citus_tenant_{tenant}.citus_notes VALUES (1, :b)"),
                {"b": f"{tenant}-note-1"},
            )
    yield made
    async with admin.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for name in names:
            await auto.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            await auto.execute(text(f"DROP ROLE IF EXISTS {name}"))
        await auto.execute(text(f"ALTER ROLE {cluster.app_role} INHERIT"))


async def test_per_tenant_roles_are_refused_on_the_cluster_and_fail_closed_unchecked(
    cluster: Cluster,
    admin: AsyncEngine,
    role_schemas: SchemaPerTenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Citus opens its worker connections as the role SET ROLE chose; a NOLOGIN tenant role
    cannot log in there. validate() refuses the set-up (C007); with the checks skipped, the
    read fails: an error, never rows (docs/scale-out.md)."""
    db = TenantDatabase(cluster.app_url, role_schemas)
    with pytest.raises(IsolationConfigError, match="C007"):
        await db.validate()
    await db.dispose()

    async def no_findings(conn: object) -> list[object]:
        return []

    monkeypatch.setattr(role_schemas, "check", no_findings)
    db = TenantDatabase(cluster.app_url, role_schemas)
    await db.validate()
    try:
        async with tenant_scope(Tenant("acme")), db.session() as s:
            with pytest.raises(DBAPIError, match="is not permitted to log in"):
                await s.execute(select(Note))
    finally:
        await db.dispose()
    assert await bodies(admin, "globex") == {1: "globex-note-1"}
