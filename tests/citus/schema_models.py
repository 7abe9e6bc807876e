"""Schema mode on the cluster: the tenant tables, the strategy with ``citus=True`` and a
provisioner with its own registry, so tenants are made the way an application makes them."""

from __future__ import annotations

from sqlalchemy import ForeignKey, MetaData, Text, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_tenancy.operations.provisioning import TenantProvisioner
from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table

REGISTRY = "citus_schema_registry"
NAMING = "citus_schema_{id}"


class Base(DeclarativeBase):
    metadata = MetaData()


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)


class Entry(Base):
    """Colocated with its account: both single-shard tables of the tenant's schema."""

    __tablename__ = "entries"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    memo: Mapped[str] = mapped_column(Text)


def schema_strategy() -> SchemaPerTenant:
    return SchemaPerTenant(metadata=Base.metadata, naming=NAMING, shared_schema=None, citus=True)


def schema_of(tenant: str) -> str:
    return NAMING.format(id=tenant)


def schema_provisioner(admin: AsyncEngine, app_role: str) -> TenantProvisioner:
    return TenantProvisioner(
        admin, schema_strategy(), app_role=app_role, table=tenants_table(name=REGISTRY)
    )


async def reset(admin: AsyncEngine, *tenants: str) -> None:
    """The registry there and empty (``migrate --all`` sees only this test's tenants), the
    schemas of ``tenants`` gone."""
    async with admin.begin() as conn:
        await conn.run_sync(tenants_table(name=REGISTRY).create, checkfirst=True)
        await conn.execute(text(f"DELETE FROM {REGISTRY}"))
        for tenant in tenants:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {schema_of(tenant)} CASCADE"))


async def seed(conn: AsyncConnection, tenant: str, rows: int) -> None:
    """``rows`` accounts and entries with the same ids in every tenant, texts naming it."""
    schema = schema_of(tenant)
    await conn.execute(
        text(
            f"INSERT INTO {schema}.accounts SELECT g, CAST(:t AS text) || '-account-' || g"
            " FROM generate_series(1, :n) g"
        ),
        {"t": tenant, "n": rows},
    )
    await conn.execute(
        text(
            f"INSERT INTO {schema}.entries SELECT g, g, CAST(:t AS text) || '-entry-' || g"
            " FROM generate_series(1, :n) g"
        ),
        {"t": tenant, "n": rows},
    )
