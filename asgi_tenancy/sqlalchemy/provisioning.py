"""``TenantProvisioner``: create, suspend, activate and drop tenants under any strategy.

It is also the one object the ``asgi-tenancy`` command line loads (``--app module:attribute``),
so ``tenants``, ``migrate`` and ``policy`` all see the application's own strategy and registry.
It works as the owner role (``admin_engine``), never as the application role.

Onboarding is all-or-nothing: the registry row and a tenant schema (or role) are created in one
transaction; a tenant database, which PostgreSQL cannot create inside one, is registered
``suspended`` first and activated last, and removed again if any step fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ConfirmationRequired, IsolationConfigError, TenantNotFound
from ..tenant import Tenant, TenantStatus, validate_tenant_id
from ._placement import DatabasePlacement, RegistryPlacement, SchemaPlacement
from ._registry import Registry
from .database_per_tenant import DatabasePerTenant
from .schema import SchemaPerTenant
from .store import _tenant_from_row, tenants_table
from .strategy import IsolationStrategy

__all__ = ["TenantProvisioner"]

_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


class TenantProvisioner:
    """Lifecycle operations for one application's tenants.

    ``admin_engine`` connects as the owner of the tables (it creates schemas, databases and
    policies); ``app_role`` is the role the application serves requests as, which gets DML
    grants only; ``table`` is the tenants registry (``tenants_table()`` by default), the same
    table ``SqlAlchemyTenantStore`` reads. For ``DatabasePerTenant``: ``metadata`` holds the
    tables created in every new database, ``database_naming`` names it (``{id}``), and
    ``app_url`` (the application role's URL on the admin's server) becomes the tenant's
    ``database_url`` attribute unless the strategy has ``url_for``.
    """

    def __init__(
        self,
        admin_engine: AsyncEngine,
        strategy: IsolationStrategy,
        *,
        app_role: str,
        table: sa.Table | None = None,
        metadata: sa.MetaData | None = None,
        app_url: str | URL | None = None,
        database_naming: str = "tenant_{id}",
    ) -> None:
        if not isinstance(admin_engine, AsyncEngine):
            raise IsolationConfigError("TenantProvisioner needs an AsyncEngine")
        if not isinstance(strategy, IsolationStrategy):
            raise IsolationConfigError("TenantProvisioner needs an isolation strategy")
        if not isinstance(app_role, str) or not _ROLE.match(app_role):
            raise IsolationConfigError(
                "app_role must be a lower-case PostgreSQL role name",
                hint="the role the application connects as, e.g. 'app'",
            )
        if (
            isinstance(strategy, SchemaPerTenant)
            and metadata is not None
            and metadata is not strategy.metadata
        ):
            raise IsolationConfigError(
                "SchemaPerTenant creates the tables of its own metadata",
                hint="pass metadata to SchemaPerTenant(metadata=...), not to the provisioner",
            )
        if "{id}" not in database_naming:
            raise IsolationConfigError(
                "database_naming must contain {id}", hint="for example 'tenant_{id}'"
            )
        self.admin_engine = admin_engine
        self.strategy = strategy
        self.app_role = app_role
        self.table = table if table is not None else tenants_table()
        self.metadata = metadata
        self.app_url = make_url(app_url) if app_url is not None else None
        self.database_naming = database_naming
        self._registry = Registry(self.table)

    def __repr__(self) -> str:
        return f"TenantProvisioner(strategy={self.strategy.name!r}, app_role={self.app_role!r})"

    async def list_tenants(self) -> list[Tenant]:
        """Every registered tenant, active or not, ordered by id."""
        columns = (self.table.c.id, self.table.c.status, self.table.c.attributes)
        async with self.admin_engine.connect() as conn:
            rows = (await conn.execute(sa.select(*columns).order_by(self.table.c.id))).all()
        return [_tenant_from_row(*row) for row in rows]

    async def get(self, tenant_id: str) -> Tenant | None:
        """One registered tenant, or ``None``."""
        validate_tenant_id(tenant_id)
        columns = (self.table.c.id, self.table.c.status, self.table.c.attributes)
        async with self.admin_engine.connect() as conn:
            row = (
                await conn.execute(sa.select(*columns).where(self.table.c.id == tenant_id))
            ).first()
        return None if row is None else _tenant_from_row(*row)

    async def create_tenant(
        self, tenant_id: str, attributes: Mapping[str, Any] | None = None
    ) -> Tenant:
        """Register a tenant and create its schema or database; all of it, or nothing.

        Raises ``TenantExists`` when the id is registered or its schema, role or database is
        already there; any other failure removes what was created and re-raises the original.
        """
        draft = Tenant(validate_tenant_id(tenant_id), attributes=attributes or {})
        placement = self._placement()
        tenant = Tenant(draft.id, attributes=placement.attributes(draft))
        await placement.create(tenant)
        return tenant

    async def drop_tenant(self, tenant_id: str, *, confirm: bool = False) -> None:
        """Remove the tenant's registry row and its schema, role or database, for good.

        Refuses with ``ConfirmationRequired`` unless ``confirm=True``; ``TenantNotFound`` when
        the id is not registered. Rows of shared tables (row-level strategies) are kept.
        """
        validate_tenant_id(tenant_id)
        if confirm is not True:
            raise ConfirmationRequired(
                "dropping a tenant deletes its data", hint="call drop_tenant(..., confirm=True)"
            )
        await self._placement().drop(tenant_id)

    async def suspend(self, tenant_id: str) -> Tenant:
        """Mark the tenant suspended: stores answer it as not found (after their cache TTL)."""
        return await self._set_status(tenant_id, TenantStatus.SUSPENDED)

    async def activate(self, tenant_id: str) -> Tenant:
        """Mark the tenant active again."""
        return await self._set_status(tenant_id, TenantStatus.ACTIVE)

    async def dispose(self) -> None:
        """Close the admin engine's pool (the command line calls it before exiting)."""
        await self.admin_engine.dispose()

    async def _set_status(self, tenant_id: str, status: TenantStatus) -> Tenant:
        validate_tenant_id(tenant_id)
        async with self.admin_engine.begin() as conn:
            tenant = await self._registry.set_status(conn, tenant_id, status)
        if tenant is None:
            raise TenantNotFound()
        return tenant

    def _placement(self) -> RegistryPlacement:
        if isinstance(self.strategy, SchemaPerTenant):
            return SchemaPlacement(self, self.strategy)
        if isinstance(self.strategy, DatabasePerTenant):
            return DatabasePlacement(self, self.strategy)
        return RegistryPlacement(self)
