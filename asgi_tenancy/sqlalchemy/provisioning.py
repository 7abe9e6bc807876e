"""``TenantProvisioner``: create, suspend, activate and drop tenants under any strategy.

It is also the one object the ``asgi-tenancy`` command line loads (``--app module:attribute``),
so ``tenants``, ``migrate`` and ``policy`` all see the application's own strategy and registry.
It works as the owner role (``admin_engine``), never as the application role.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import IsolationConfigError
from ..tenant import Tenant, validate_tenant_id
from .store import _tenant_from_row, tenants_table
from .strategy import IsolationStrategy

__all__ = ["TenantProvisioner"]

_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


class TenantProvisioner:
    """Lifecycle operations for one application's tenants.

    ``admin_engine`` connects as the owner of the tables (it creates schemas, databases and
    policies); ``app_role`` is the role the application serves requests as, which gets DML
    grants only; ``table`` is the tenants registry (``tenants_table()`` by default), the same
    table ``SqlAlchemyTenantStore`` reads.
    """

    def __init__(
        self,
        admin_engine: AsyncEngine,
        strategy: IsolationStrategy,
        *,
        app_role: str,
        table: sa.Table | None = None,
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
        self.admin_engine = admin_engine
        self.strategy = strategy
        self.app_role = app_role
        self.table = table if table is not None else tenants_table()

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
