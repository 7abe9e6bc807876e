"""A real, tiny Alembic project for the migration tests, and tenants made with plain DDL.

Two tenant revisions: ``r1`` creates ``items``; ``r2`` adds ``items.price`` and creates
``prices``. A tenant schema that already holds a ``prices`` table therefore fails at ``r2``,
after ``r1`` ran in the same transaction: the case that proves a failure leaves nothing behind.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from asgi_tenancy import Tenant, TenantStatus
from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table
from asgi_tenancy.sqlalchemy.migrations import env_template

R1, R2 = "r1_items", "r2_price"

_REVISIONS = {
    R1: f'''
import sqlalchemy as sa
from alembic import op

revision = "{R1}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
    )
''',
    R2: f'''
import sqlalchemy as sa
from alembic import op

revision = "{R2}"
down_revision = "{R1}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("price", sa.Integer, nullable=True))
    op.create_table("prices", sa.Column("id", sa.Integer, primary_key=True))
''',
}

SHARED_REVISION = "s1_plans"
_SHARED = f'''
import sqlalchemy as sa
from alembic import op

revision = "{SHARED_REVISION}"
down_revision = None
branch_labels = ("shared",)
depends_on = None


def upgrade() -> None:
    op.create_table("plans", sa.Column("id", sa.Integer, primary_key=True))
'''

R3_AUTOCOMMIT = "r3_autocommit"
_AUTOCOMMIT = f'''
import sqlalchemy as sa
from alembic import op

revision = "{R3_AUTOCOMMIT}"
down_revision = "{R2}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY notes_id ON notes (id)")
'''


def write_project(
    root: Path,
    *,
    revisions: tuple[str, ...] = (R1, R2),
    shared: bool = False,
    autocommit: bool = False,
) -> Path:
    """An alembic.ini and script directory (the shipped env.py); returns the ini path."""
    scripts = root / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(env_template())
    for name in revisions:
        (scripts / "versions" / f"{name}.py").write_text(_REVISIONS[name])
    if shared:
        (scripts / "versions" / f"{SHARED_REVISION}.py").write_text(_SHARED)
    if autocommit:
        (scripts / "versions" / f"{R3_AUTOCOMMIT}.py").write_text(_AUTOCOMMIT)
    ini = root / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = migrations\n")
    return ini


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


async def make_provisioner(admin_engine: AsyncEngine) -> TenantProvisioner:
    """A provisioner with its own tenants table, so tests never see each other's tenants."""
    table = tenants_table(name=unique("tenants_"))
    async with admin_engine.begin() as conn:
        await conn.run_sync(table.create)
    return TenantProvisioner(
        admin_engine, SchemaPerTenant(shared_schema=None), app_role="tenancy_app", table=table
    )


async def add_tenants(
    provisioner: TenantProvisioner,
    count: int,
    *,
    status: TenantStatus = TenantStatus.ACTIVE,
    prefix: str = "t",
) -> list[Tenant]:
    """Registered tenants with an empty schema each, granted to the app role."""
    tenants = [Tenant(unique(prefix), status) for _ in range(count)]
    async with provisioner.admin_engine.begin() as conn:
        for tenant in tenants:
            schema = schema_of(provisioner, tenant)
            await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            await conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema}" TO tenancy_app'))
            await conn.execute(provisioner.table.insert().values(id=tenant.id, status=status.value))
    return tenants


def schema_of(provisioner: TenantProvisioner, tenant: Tenant) -> str:
    strategy = provisioner.strategy
    assert isinstance(strategy, SchemaPerTenant)
    return strategy.schema_for(tenant)


async def version_of(conn: AsyncConnection, schema: str) -> str | None:
    """The schema's alembic_version row, read back as the owner; None when it has no table."""
    exists = await conn.scalar(
        sa.text("SELECT to_regclass(:t)"), {"t": f'"{schema}".alembic_version'}
    )
    if exists is None:
        return None
    version = await conn.scalar(sa.text(f'SELECT version_num FROM "{schema}".alembic_version'))
    assert version is None or isinstance(version, str)
    return version


async def tables_of(conn: AsyncConnection, schema: str) -> set[str]:
    rows = await conn.execute(
        sa.text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
    )
    return set(rows.scalars())


async def columns_of(conn: AsyncConnection, schema: str, table: str) -> set[str]:
    rows = await conn.execute(
        sa.text(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = :s AND table_name = :t"
        ),
        {"s": schema, "t": table},
    )
    return set(rows.scalars())


async def status_of(provisioner: TenantProvisioner, tenant: Tenant) -> str:
    found = await provisioner.get(tenant.id)
    assert found is not None
    return found.status.value
