"""Where DatabasePerTenant keeps a tenant: a database of its own, made, dropped, migrated and
audited as the owner.

``CREATE DATABASE`` cannot run in a transaction, so the provisioner registers the row
``suspended`` (never served), this placement builds the database (and removes it again if a
step fails), then the row is activated. Every database made here carries the marker comment of
its tenant; a drop removes only a database that carries the marker of the tenant dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ...checks import Finding
from ...errors import IsolationConfigError, TenantExists, TenantPlacementError
from ...tenant import Tenant
from ..failures import sqlstate
from ..grants import GrantCodes, check_grants, in_database
from ..migrations import read_revision
from ..moves import Progress, TenantMove
from ..placement import UNREADABLE, AuditContext, Placement, PlacementContext, Target
from ..postgres import check_name, dml_grants, exists, owned_by, quote_ident, superuser_fix
from .databases import IDENTITY_SQL, autocommit, build_database, drop_database, url_target
from .move import move_database

if TYPE_CHECKING:
    from .strategy import DatabasePerTenant

__all__ = ["IDENTITY_SQL", "DatabasePlacement", "url_target"]

_CENTRAL = "the application's own database"
_MISSING_DATABASE = "3D000"  # invalid_catalog_name


class DatabasePlacement(Placement):
    """A database per tenant on the admin engine's server."""

    per_tenant = True
    transactional = False

    def __init__(self, strategy: DatabasePerTenant) -> None:
        self.strategy = strategy

    def attributes(self, tenant: Tenant, context: PlacementContext) -> dict[str, Any]:
        attributes = dict(tenant.attributes)
        attributes.setdefault("database", context.database_naming.format(id=tenant.id))
        url_attribute = self.strategy.url_attribute
        if self.strategy.url_for is None and url_attribute not in attributes:
            if context.app_url is None:
                raise IsolationConfigError(
                    "the provisioner needs app_url to write the tenant's database URL",
                    hint="TenantProvisioner(..., app_url=<app role URL>) or "
                    "DatabasePerTenant(url_for=...)",
                )
            url = context.app_url.set(database=attributes["database"])
            attributes[url_attribute] = url.render_as_string(hide_password=False)
        placed = Tenant(tenant.id, attributes=attributes)
        attributes["database"] = self._database_of(placed, context)
        return attributes

    def _database_of(self, tenant: Tenant, context: PlacementContext) -> str:
        """The database the strategy will connect the tenant to, on the admin's server only."""
        url = self.strategy.url_of(tenant)
        if url_target(url)[:3] != url_target(context.admin_engine.url)[:3]:
            raise IsolationConfigError(
                "the tenant's database would live on another server than the admin engine's",
                hint="provision it with an admin engine connected to that server",
            )
        return check_name(url.database, "database")

    async def create(
        self, context: PlacementContext, conn: AsyncConnection | None, tenant: Tenant
    ) -> None:
        name = self._database_of(tenant, context)
        async with autocommit(context.admin_engine) as admin:
            if await exists(admin, "database", name):
                raise TenantExists("the tenant's database already exists")
        await build_database(
            context.admin_engine, name, tenant.id, context.app_role, context.metadata
        )

    async def before_drop(
        self, context: PlacementContext, conn: AsyncConnection, tenant: Tenant
    ) -> None:
        name = check_name(self.strategy.url_of(tenant).database, "database")
        async with self._server_of(tenant, context) as server:
            if server is context.admin_engine:
                await owned_by(conn, "database", name, tenant.id)
            else:
                async with server.connect() as elsewhere:
                    await owned_by(elsewhere, "database", name, tenant.id)

    async def drop(
        self, context: PlacementContext, conn: AsyncConnection | None, tenant: Tenant
    ) -> None:
        name = check_name(self.strategy.url_of(tenant).database, "database")
        async with self._server_of(tenant, context) as server:
            await drop_database(server, name)

    @asynccontextmanager
    async def _server_of(
        self, tenant: Tenant, context: PlacementContext
    ) -> AsyncIterator[AsyncEngine]:
        """An owner's engine on the server the tenant's database is on: the admin engine, or,
        for a tenant moved to another server, the admin's credentials there (as ``target``)."""
        url = self.target(tenant, context).url
        if url_target(url)[:3] == url_target(context.admin_engine.url)[:3]:
            yield context.admin_engine
            return
        engine = create_async_engine(url.set(database="postgres"), poolclass=NullPool)
        try:
            yield engine
        finally:
            await engine.dispose()

    def target(self, tenant: Tenant, context: PlacementContext) -> Target:
        """The tenant database as the owner: its host and name, the admin's credentials."""
        admin = context.admin_engine.url
        url = self.strategy.url_of(tenant).set(
            drivername=admin.drivername, username=admin.username, password=admin.password
        )
        return Target(url, None)

    def grants(self, tenant: Tenant | None, context: PlacementContext) -> list[str]:
        if tenant is None:
            return []  # the shared target is the registry's database: nothing to grant
        grantee = self.strategy.url_of(tenant).username or context.app_role
        if grantee == context.admin_engine.url.username:
            return []  # the owner needs no grant
        return dml_grants("public", grantee)

    async def audit(self, audit: AuditContext) -> list[Finding]:
        audit.revision_kind = "database"
        return await _audit_databases(self.strategy, audit)

    async def move(
        self,
        context: PlacementContext,
        tenant: Tenant,
        to: str,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> TenantMove:
        """Copy the tenant's database to the server at ``to`` (its admin URL), verify, switch
        the registry, drop the source (``move.py``)."""
        return await move_database(
            self.strategy, context, tenant, to, dry_run=dry_run, progress=progress
        )


async def _audit_databases(strategy: DatabasePerTenant, audit: AuditContext) -> list[Finding]:
    """A010, D002, D004, D005 for database-per-tenant; ``audit.conn`` is the central database.
    Each database's revision goes to ``audit.revisions`` (A008 compares them)."""
    central = (await audit.conn.execute(text(IDENTITY_SQL))).one()
    identities: dict[tuple[str, str], str] = {(central.server, central.db): _CENTRAL}
    targets: dict[tuple[str, ...], str] = {}
    findings: list[Finding] = []
    for tenant in audit.tenants:
        try:
            url = strategy.url_of(tenant)
        except TenantPlacementError:
            findings.append(
                Finding(
                    "D005",
                    f"tenant {tenant.id}",
                    "the tenant has no usable PostgreSQL database URL",
                    f"set the tenant attribute {strategy.url_attribute!r} in the tenant store",
                )
            )
            continue
        database = url.database or ""
        owner = targets.setdefault(url_target(url), tenant.id)
        if owner != tenant.id:
            findings.append(_shared_database(database, owner, tenant))
            continue
        try:
            identity, superuser, revision, grants = await _inspect_database(url)
        except _Unreachable as exc:
            findings.append(
                Finding(
                    "A010",
                    database,
                    f"tenant {tenant.id!r}'s database "
                    + ("does not exist" if exc.missing else "cannot be reached"),
                    f"CREATE DATABASE {quote_ident(database)}"
                    if exc.missing
                    else "check the host, port and credentials of the tenant's database URL",
                )
            )
            continue
        owner = identities.setdefault(identity, tenant.id)
        if owner != tenant.id:
            findings.append(_shared_database(database, owner, tenant))
        findings += in_database(database, grants)
        if superuser is not None:
            findings.append(
                Finding(
                    "D004",
                    database,
                    f"tenant {tenant.id!r} connects as a superuser, which can reach every "
                    "database on the server",
                    superuser_fix(url.username or "CURRENT_USER", bootstrap=superuser),
                )
            )
        audit.revisions[database] = revision
    return findings


class _Unreachable(Exception):
    """A tenant database the audit could not connect to; ``missing`` when it does not exist."""

    def __init__(self, missing: bool) -> None:
        super().__init__()
        self.missing = missing


async def _inspect_database(
    url: URL,
) -> tuple[tuple[str, str], bool | None, str | None, list[Finding]]:
    """Identity, superuser (``None`` if not; else whether it is the bootstrap one), Alembic
    revision and missing grants (D006, D007: every table of the tenant's own database is its
    tenant's) of one tenant database, as its role."""
    engine = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": 10})
    try:
        try:
            conn = await engine.connect()
        except Exception as exc:
            # The driver's message may carry the URL: only the SQLSTATE is kept, never the text.
            raise _Unreachable(sqlstate(exc) == _MISSING_DATABASE) from None
        try:
            row = (await conn.execute(text(IDENTITY_SQL))).one()
            names = [(r.schema, r.name) for r in await conn.execute(text(USER_TABLES_SQL))]
            grants = await check_grants(conn, _GRANTS, tenant_tables=names)
            try:
                revision = await conn.run_sync(read_revision, None)
            except DBAPIError:  # the tenant's role may not read it: a revision unknown
                revision = UNREADABLE
        finally:
            await conn.close()
    finally:
        await engine.dispose()
    superuser = bool(row.bootstrap) if row.superuser else None
    return (row.server, row.db), superuser, revision, grants


_GRANTS = GrantCodes(table="D006", sequence="D007")
#: The tables of a tenant's database, bookkeeping aside, in the schemas its role may use.
USER_TABLES_SQL = (
    "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c"
    " JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
    " AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
    " AND (n.nspname = 'public' OR has_schema_privilege(n.oid, 'USAGE'))"
    " AND c.relname <> 'alembic_version' ORDER BY 1"
)


def _shared_database(database: str, owner: str, tenant: Tenant) -> Finding:
    other = "the application's own database" if owner == _CENTRAL else f"tenant {owner!r}"
    return Finding(
        "D002",
        database,
        f"tenant {tenant.id!r} is placed on the database of {other}",
        "give every tenant its own database (fix its URL in the tenant store)",
    )
