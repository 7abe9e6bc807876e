"""A ``TenantStore`` reading a ``tenants`` table in a shared schema.

The store only reads; the registry is written by operations (``TenantProvisioner``, the
migration runner) through ``asgi_tenancy.operations.registry``, as the owner role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

from ..checks import Finding
from ..errors import IsolationConfigError, TenantStoreContractError, TenantStoreUnavailable
from ..tenant import Tenant, TenantStatus, validate_tenant_id
from .grants import check_registry

__all__ = ["SqlAlchemyTenantStore", "create_tenants_table", "tenants_table"]

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def tenants_table(
    metadata: sa.MetaData | None = None, *, schema: str | None = "public", name: str = "tenants"
) -> sa.Table:
    """The ``tenants`` table: id, status, attributes (JSON), created_at, updated_at.

    It lives in a shared schema (``public`` by default, named explicitly so a tenant's
    ``search_path`` can never redirect it); pass ``metadata`` to add it to your migrations.
    """
    return sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("attributes", _JSON, nullable=False, server_default=sa.text("'{}'")),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
            onupdate=sa.func.now(),
        ),
        sa.CheckConstraint(
            "status IN ('active', 'suspended', 'migrating')", name=f"{name}_status_check"
        ),
        schema=schema,
    )


async def create_tenants_table(engine: AsyncEngine, table: sa.Table | None = None) -> sa.Table:
    """Create the tenants table if missing (run it as the schema owner, not the app role)."""
    table = table if table is not None else tenants_table()
    async with engine.begin() as conn:
        await conn.run_sync(table.create, checkfirst=True)
    return table


class SqlAlchemyTenantStore:
    """Tenants read from a table with SQLAlchemy; wrap it in ``CachedTenantStore`` for speed.

    Use an engine that no tenant strategy binds (a plain or admin engine): tenants are looked
    up before any tenant scope exists.
    """

    def __init__(self, engine: AsyncEngine, *, table: sa.Table | None = None) -> None:
        if not isinstance(engine, AsyncEngine):
            raise IsolationConfigError("SqlAlchemyTenantStore needs an AsyncEngine")
        self.engine = engine
        self.table = table if table is not None else tenants_table()
        self._select = sa.select(
            self.table.c.id, self.table.c.status, self.table.c.attributes
        ).where(self.table.c.id == sa.bindparam("tenant_id"))

    async def get(self, tenant_id: str) -> Tenant | None:
        validate_tenant_id(tenant_id)
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(self._select, {"tenant_id": tenant_id})).all()
        except Exception as exc:  # driver, network and pool errors alike: the store is down
            raise TenantStoreUnavailable() from exc
        if not rows:
            return None
        if len(rows) > 1:  # a table without a unique id, or a collation that folds ids
            raise TenantStoreContractError("tenants table holds the id more than once")
        row = rows[0]
        if row.id != tenant_id:  # e.g. a CHAR column padding the id, or a case-folding type
            raise TenantStoreContractError("tenants table answered with another id")
        return tenant_from_row(row.id, row.status, row.attributes)

    async def check(self) -> list[Finding]:
        """T001 at start-up: the store's role can read the registry (else every request 503)."""
        if self.engine.dialect.name != "postgresql":
            return []
        async with self.engine.connect() as conn:
            return await check_registry(conn, self.table)


_STATUSES = frozenset(status.value for status in TenantStatus)


def tenant_from_row(tenant_id: Any, status: Any, attributes: Any) -> Tenant:
    """A registry row as a ``Tenant``; anything malformed is a ``TenantStoreContractError``."""
    if status not in _STATUSES:
        raise TenantStoreContractError("tenants table holds an unknown status")
    if not isinstance(attributes, Mapping):
        raise TenantStoreContractError("tenants table holds attributes that are not an object")
    try:
        return Tenant(tenant_id, TenantStatus(status), attributes)
    except Exception as exc:
        raise TenantStoreContractError("tenants table holds a malformed record") from exc
