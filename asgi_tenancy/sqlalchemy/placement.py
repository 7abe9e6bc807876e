"""Where a strategy keeps one tenant's data, as operations (run as the owner) need to know it.

Provisioning, migrations and the audit hold no knowledge of any strategy: they ask its
``placement`` what to register, create, drop, grant, migrate and inspect. The default here is
the shared-tables case (row-level security, query scoping): a registry row and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..checks import Finding
from ..errors import IsolationConfigError
from ..tenant import Tenant
from .moves import Progress, TenantMove

__all__ = ["UNREADABLE", "AuditContext", "Placement", "PlacementContext", "Target"]

#: A revision in ``AuditContext.revisions`` that the serving role may not read.
UNREADABLE = "(unreadable)"


@dataclass(frozen=True, slots=True)
class PlacementContext:
    """What the operations side knows: the owner's engine, the serving role, the registry."""

    admin_engine: AsyncEngine
    app_role: str
    registry: Table
    metadata: MetaData | None = None  # tables made in every new tenant database
    app_url: URL | None = None  # the serving role's URL on the admin's server
    database_naming: str = "tenant_{id}"


@dataclass(frozen=True, slots=True)
class Target:
    """One migration target: the owner's URL for it, and the schema its tables live in."""

    url: URL
    schema: str | None


@dataclass(slots=True)
class AuditContext:
    """One audit run: a connection as the owner, and what the audit knows of the application.

    ``as_app_role()`` runs a block as the application role (rolled back after); ``revisions``
    collects each target's Alembic revision for the cross-tenant comparison (A008).
    """

    conn: AsyncConnection
    app_role: str
    tenants: Sequence[Tenant]
    registry: Table | None
    schemas: Sequence[str] | None
    shared_tables: frozenset[str]
    as_app_role: Callable[[], AbstractAsyncContextManager[None]]
    inspected: list[str] = field(default_factory=list)
    revisions: dict[str, str | None] = field(default_factory=dict)
    revision_kind: str = "schema"


class Placement:
    """Shared tables: tenants are registry rows; nothing is made, dropped or migrated apart."""

    #: Each tenant has a schema or database of its own (and is migrated on its own).
    per_tenant: ClassVar[bool] = False
    #: Creating a tenant runs inside the registry row's transaction (``CREATE DATABASE`` cannot).
    transactional: ClassVar[bool] = True

    def configure(self, context: PlacementContext) -> None:
        """Refuse a provisioner configuration this placement cannot honour (at construction)."""

    def attributes(self, tenant: Tenant, context: PlacementContext) -> dict[str, Any]:
        """What to register for ``tenant``: its attributes, with the names it is placed under."""
        return dict(tenant.attributes)

    async def create(
        self, context: PlacementContext, conn: AsyncConnection | None, tenant: Tenant
    ) -> None:
        """Make the tenant's schema or database; ``conn`` is the registry row's transaction
        (``None`` when not ``transactional``: the placement connects, and undoes its own)."""

    async def before_drop(
        self, context: PlacementContext, conn: AsyncConnection, tenant: Tenant
    ) -> None:
        """Refuse to drop what was not made for ``tenant``; runs with the row locked."""

    async def drop(
        self, context: PlacementContext, conn: AsyncConnection | None, tenant: Tenant
    ) -> None:
        """Remove the tenant's schema or database (``conn`` as in ``create``)."""

    def target(self, tenant: Tenant, context: PlacementContext) -> Target | None:
        """Where the tenant's migrations run; ``None``: it shares the application's tables."""
        return None

    def shared_target(self, context: PlacementContext) -> Target:
        """Where the shared branch of the migrations runs."""
        return Target(context.admin_engine.url, None)

    def grants(self, tenant: Tenant | None, context: PlacementContext) -> list[str]:
        """DML grants a migration re-applies in its transaction (``None``: the shared target)."""
        return []

    async def audit(self, audit: AuditContext) -> list[Finding]:
        """Findings about where the tenants live, read as the owner."""
        return []

    async def move(
        self,
        context: PlacementContext,
        tenant: Tenant,
        to: str,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> TenantMove:
        """Move the tenant's data to ``to`` while it keeps serving reads (``dry_run``: the plan).

        Shared tables on one server have nowhere to move a tenant to.
        """
        raise IsolationConfigError(
            "this strategy's tenants share one server's tables: there is nowhere to move one to",
            hint="moves: RowLevelSecurity(citus=True), SchemaPerTenant(citus=True),"
            " DatabasePerTenant (docs/scale-out.md)",
        )
