"""The one writer of the tenants registry; every write runs in the caller's transaction.

Its rules hold for every caller: a new id is claimed race-free; only the migration runner ends
its own ``migrating`` mark, so activating cannot lift the 503 of a tenant whose migration is
still running; suspending is always allowed. ``SqlAlchemyTenantStore`` only reads.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import TenantExists, TenantMigrating, TenantNotFound
from ..sqlalchemy.store import tenant_from_row
from ..tenant import Tenant, TenantStatus

__all__ = ["Registry"]


class Registry:
    """The registry rows operations claim, read, lock, update and delete."""

    def __init__(self, table: sa.Table) -> None:
        self.table = table
        self._columns = (table.c.id, table.c.status, table.c.attributes)

    # -- reads -----------------------------------------------------------------------------

    async def all(self, conn: AsyncConnection) -> list[Tenant]:
        """Every registered tenant, active or not, ordered by id."""
        rows = await conn.execute(sa.select(*self._columns).order_by(self.table.c.id))
        return [tenant_from_row(*row) for row in rows]

    async def get(self, conn: AsyncConnection, tenant_id: str) -> Tenant | None:
        row = (
            await conn.execute(sa.select(*self._columns).where(self.table.c.id == tenant_id))
        ).first()
        return None if row is None else tenant_from_row(*row)

    async def lock(self, conn: AsyncConnection, tenant_id: str) -> Tenant:
        """The tenant's row, locked until the transaction ends; ``TenantNotFound`` if none."""
        row = (
            await conn.execute(
                sa.select(*self._columns).where(self.table.c.id == tenant_id).with_for_update()
            )
        ).first()
        if row is None:
            raise TenantNotFound()
        return tenant_from_row(*row)

    # -- writes ----------------------------------------------------------------------------

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

    async def set_status(
        self, conn: AsyncConnection, tenant_id: str, status: TenantStatus
    ) -> Tenant:
        """Set the status; a tenant being migrated is left to the migration (``TenantMigrating``).

        Re-running ``migrate`` clears a stale mark left by a crashed run.
        """
        current = await self.lock(conn, tenant_id)
        if current.status is TenantStatus.MIGRATING and status is not TenantStatus.SUSPENDED:
            raise TenantMigrating("the tenant is being migrated; run migrate to finish it")
        updated = await self._update(conn, tenant_id, status, None)
        assert updated is not None  # the row is locked: it is there
        return updated

    async def begin_migration(self, conn: AsyncConnection, tenant_id: str) -> bool:
        """Active (or left migrating by a crashed run) becomes migrating; anything else stays.

        Whether the tenant was marked (a suspended tenant is migrated without a mark).
        """
        allowed = (TenantStatus.ACTIVE, TenantStatus.MIGRATING)
        return await self._update(conn, tenant_id, TenantStatus.MIGRATING, allowed) is not None

    async def end_migration(self, conn: AsyncConnection, tenant_id: str) -> None:
        """The migration's own mark ends: migrating becomes active again."""
        await self._update(conn, tenant_id, TenantStatus.ACTIVE, (TenantStatus.MIGRATING,))

    async def remove(self, conn: AsyncConnection, tenant_id: str) -> None:
        await conn.execute(sa.delete(self.table).where(self.table.c.id == tenant_id))

    async def _update(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        status: TenantStatus,
        only_from: tuple[TenantStatus, ...] | None,
    ) -> Tenant | None:
        where = [self.table.c.id == tenant_id]
        if only_from is not None:
            where.append(self.table.c.status.in_([s.value for s in only_from]))
        row = (
            await conn.execute(
                sa.update(self.table)
                .where(*where)
                .values(status=status.value, updated_at=sa.func.now())
                .returning(*self._columns)
            )
        ).first()
        return None if row is None else tenant_from_row(*row)
