"""Writes to the tenants registry table, each inside the caller's transaction."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import TenantExists, TenantMigrating, TenantNotFound
from ..tenant import Tenant, TenantStatus
from .store import _tenant_from_row


class Registry:
    """The registry rows the provisioner claims, locks, updates and deletes."""

    def __init__(self, table: sa.Table) -> None:
        self.table = table
        self._columns = (table.c.id, table.c.status, table.c.attributes)

    async def claim(self, conn: AsyncConnection, tenant: Tenant, status: TenantStatus) -> None:
        """Insert the tenant's row; ``TenantExists`` if the id is taken (race-free)."""
        statement = (
            insert(self.table)
            .values(id=tenant.id, status=status.value, attributes=dict(tenant.attributes))
            .on_conflict_do_nothing(index_elements=[self.table.c.id])
            .returning(self.table.c.id)
        )
        if (await conn.execute(statement)).first() is None:
            raise TenantExists("a tenant with this id is already registered")

    async def lock(self, conn: AsyncConnection, tenant_id: str) -> Tenant:
        """The tenant's row, locked until the transaction ends; ``TenantNotFound`` if none."""
        row = (
            await conn.execute(
                sa.select(*self._columns).where(self.table.c.id == tenant_id).with_for_update()
            )
        ).first()
        if row is None:
            raise TenantNotFound()
        return _tenant_from_row(*row)

    async def set_status(
        self, conn: AsyncConnection, tenant_id: str, status: TenantStatus
    ) -> Tenant | None:
        """Set the status; a tenant being migrated is left to the migration (``TenantMigrating``).

        Only the migration runner ends its own mark, so activating cannot lift the 503 of a
        tenant whose migration is still running (re-running ``migrate`` clears a stale mark).
        """
        current = await self.lock(conn, tenant_id)
        if current.status is TenantStatus.MIGRATING and status is not TenantStatus.SUSPENDED:
            raise TenantMigrating("the tenant is being migrated; run migrate to finish it")
        row = (
            await conn.execute(
                sa.update(self.table)
                .where(self.table.c.id == tenant_id)
                .values(status=status.value, updated_at=sa.func.now())
                .returning(*self._columns)
            )
        ).first()
        return None if row is None else _tenant_from_row(*row)

    async def remove(self, conn: AsyncConnection, tenant_id: str) -> None:
        await conn.execute(sa.delete(self.table).where(self.table.c.id == tenant_id))
