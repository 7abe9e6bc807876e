"""``TenantProvisioner``: create, suspend, activate and drop tenants under any strategy.

It is also the one object the ``asgi-tenancy`` command line loads (``--app module:attribute``),
so ``tenants``, ``migrate``, ``audit`` and ``policy`` all see the application's own strategy and
registry. It works as the owner role (``admin_engine``), never as the application role.

Onboarding is all-or-nothing. What a tenant needs comes from the strategy's ``placement``:
where it can, the registry row and the tenant's schema (or role) are created in one
transaction; a tenant database, which PostgreSQL cannot create inside one, is registered
``suspended`` first, built, and activated last, and removed again if any step fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ConfirmationRequired, IsolationConfigError, TenantNotFound
from ..sqlalchemy.moves import Progress, TenantMove
from ..sqlalchemy.placement import Placement, PlacementContext
from ..sqlalchemy.store import tenants_table
from ..sqlalchemy.strategy import IsolationStrategy
from ..tenant import Tenant, TenantStatus, validate_tenant_id
from .registry import Registry

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
        self.context = PlacementContext(
            admin_engine=admin_engine,
            app_role=app_role,
            registry=self.table,
            metadata=metadata,
            app_url=self.app_url,
            database_naming=database_naming,
        )
        self.placement: Placement = strategy.placement
        self.placement.configure(self.context)
        self.registry = Registry(self.table)

    def __repr__(self) -> str:
        return f"TenantProvisioner(strategy={self.strategy.name!r}, app_role={self.app_role!r})"

    async def list_tenants(self) -> list[Tenant]:
        """Every registered tenant, active or not, ordered by id."""
        async with self.admin_engine.connect() as conn:
            return await self.registry.all(conn)

    async def get(self, tenant_id: str) -> Tenant | None:
        """One registered tenant, or ``None``."""
        validate_tenant_id(tenant_id)
        async with self.admin_engine.connect() as conn:
            return await self.registry.get(conn, tenant_id)

    async def create_tenant(
        self, tenant_id: str, attributes: Mapping[str, Any] | None = None
    ) -> Tenant:
        """Register a tenant and create its schema or database; all of it, or nothing.

        Raises ``TenantExists`` when the id is registered or its schema, role or database is
        already there; any other failure removes what was created and re-raises the original.
        """
        draft = Tenant(validate_tenant_id(tenant_id), attributes=attributes or {})
        tenant = Tenant(draft.id, attributes=self.placement.attributes(draft, self.context))
        if self.placement.transactional:
            async with self.admin_engine.begin() as conn:  # a failure leaves nothing
                await self.registry.claim(conn, tenant, TenantStatus.ACTIVE)
                await self.placement.create(self.context, conn, tenant)
            return tenant
        # Registered suspended (never served) until everything outside the transaction is made.
        async with self.admin_engine.begin() as conn:
            await self.registry.claim(conn, tenant, TenantStatus.SUSPENDED)
        made = False
        try:
            await self.placement.create(self.context, None, tenant)  # undoes its own part
            made = True
            async with self.admin_engine.begin() as conn:
                await self.registry.set_status(conn, tenant.id, TenantStatus.ACTIVE)
        except BaseException as exc:
            await self._undo(tenant, exc, made)
            raise
        return tenant

    async def _undo(self, tenant: Tenant, exc: BaseException, made: bool) -> None:
        """Remove what ``create_tenant`` made, newest first; the original error propagates."""
        if made:
            try:
                await self.placement.drop(self.context, None, tenant)
            except Exception as cleanup:
                exc.add_note(
                    f"asgi-tenancy: removing the placement failed ({type(cleanup).__name__})"
                )
        try:
            async with self.admin_engine.begin() as conn:
                await self.registry.remove(conn, tenant.id)
        except Exception as cleanup:
            exc.add_note(
                f"asgi-tenancy: removing the registry row failed ({type(cleanup).__name__})"
            )

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
        if self.placement.transactional:
            async with self.admin_engine.begin() as conn:
                tenant = await self.registry.lock(conn, tenant_id)
                await self.placement.before_drop(self.context, conn, tenant)
                await self.placement.drop(self.context, conn, tenant)
                await self.registry.remove(conn, tenant_id)
            return
        # Suspended first, so a failure part way leaves a tenant that is not served and that
        # another drop_tenant() can finish.
        async with self.admin_engine.begin() as conn:
            tenant = await self.registry.lock(conn, tenant_id)
            await self.placement.before_drop(self.context, conn, tenant)
            await self.registry.set_status(conn, tenant_id, TenantStatus.SUSPENDED)
        await self.placement.drop(self.context, None, tenant)
        async with self.admin_engine.begin() as conn:
            await self.registry.remove(conn, tenant_id)

    async def move_tenant(
        self,
        tenant_id: str,
        to: str,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> TenantMove:
        """Move a registered tenant's data to ``to`` while it keeps serving reads.

        What ``to`` names depends on the strategy (a Citus node as ``host:port`` or node id; a
        PostgreSQL server's admin URL under database per tenant); ``dry_run`` returns the plan
        and changes nothing. ``TenantNotFound`` when the id is not registered.
        """
        validate_tenant_id(tenant_id)
        async with self.admin_engine.connect() as conn:
            tenant = await self.registry.get(conn, tenant_id)
        if tenant is None:
            raise TenantNotFound()
        return await self.placement.move(
            self.context, tenant, to, dry_run=dry_run, progress=progress
        )

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
            return await self.registry.set_status(conn, tenant_id, status)
