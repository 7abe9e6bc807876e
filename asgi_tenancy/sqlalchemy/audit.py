"""The isolation audit: read the live catalog and report every way isolation would not hold.

Two modes. Catalog-only (no strategy): every table with the tenant column is a row-level
security tenant table, checked with ``RowLevelSecurity.check`` run as the application role,
plus what that check does not judge (``audit_rls``). With the application's strategy and
tenants: the strategy's own ``check`` as the application role, then each tenant's schema or
database (``audit_placement``). Findings are never raised: the
report lists them all, each with the SQL (or the step) that fixes it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import IsolationConfigError
from ..tenant import Tenant
from .audit_placement import audit_databases, audit_schemas
from .audit_rls import audit_indexes, audit_views, catalog_tables
from .database_per_tenant import DatabasePerTenant
from .query_scoping import QueryScoping
from .rls import Finding, RowLevelSecurity
from .schema import SchemaPerTenant
from .strategy import IsolationStrategy, quote_ident

if TYPE_CHECKING:
    from .provisioning import TenantProvisioner

__all__ = ["AuditReport", "audit", "audit_provisioner"]

_ROLE = re.compile(r"[a-z_][a-z0-9_$]{0,62}\Z")
# Migration bookkeeping, never application data: not a tenant table, not "unclassified".
_BOOKKEEPING = frozenset({"alembic_version"})


@dataclass(frozen=True)
class AuditReport:
    """What the audit inspected and every finding; ``ok`` only when there is none."""

    app_role: str
    database: str
    strategy: str | None
    findings: tuple[Finding, ...]
    tables: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings

    def codes(self) -> set[tuple[str, str]]:
        """``(code, subject)`` of every finding: what tests and scripts compare."""
        return {(f.code, f.subject) for f in self.findings}

    def render(self) -> str:
        """The report as text: one block per finding, then a summary line."""
        lines = []
        for f in self.findings:
            lines.append(f"{f.code} {f.subject}: {f.message}")
            lines.extend(f"    {line}" for line in f"fix: {f.fix}".splitlines())
        scope = (
            f"database {self.database}, role {self.app_role}, "
            f"strategy {self.strategy or 'none (catalog only)'}, "
            f"{len(self.tables)} tenant tables, {len(self.tenants)} tenants"
        )
        count = len(self.findings)
        lines.append(f"{count} finding{'s' * (count != 1)} ({scope})" if count else f"ok ({scope})")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (the CLI's ``--json``)."""
        return {
            "ok": self.ok,
            "app_role": self.app_role,
            "database": self.database,
            "strategy": self.strategy,
            "tables": list(self.tables),
            "tenants": list(self.tenants),
            "findings": [
                {"code": f.code, "subject": f.subject, "message": f.message, "fix": f.fix}
                for f in self.findings
            ],
        }


async def audit(
    target: AsyncEngine | AsyncConnection,
    *,
    app_role: str,
    tenant_column: str = "tenant_id",
    shared_tables: Iterable[str] = (),
    schemas: Sequence[str] | None = None,
    strategy: IsolationStrategy | None = None,
    tenants: Sequence[Tenant] = (),
    registry: Table | None = None,
) -> AuditReport:
    """Audit the database ``target`` reaches for the application role ``app_role``.

    Connect as an owner or superuser that may ``SET ROLE`` to ``app_role``: the strategy
    checks run as that role, in a transaction that is rolled back. ``schemas`` limits the
    catalog scan (default: every schema the role may use). ``tenant_column`` is for the
    catalog-only audit: a ``RowLevelSecurity`` strategy brings its own. ``registry`` is the
    tenants table: shared by definition, and where a fix for a misplaced tenant is written.
    """
    if not isinstance(app_role, str) or not _ROLE.match(app_role):
        raise IsolationConfigError("app_role must be a plain lower-case PostgreSQL role name")
    async with _connected(target) as conn:
        return await _audit(
            conn,
            app_role=app_role,
            tenant_column=tenant_column,
            shared_tables=shared_tables,
            schemas=schemas,
            strategy=strategy,
            tenants=tenants,
            registry=registry,
        )


async def audit_provisioner(
    provisioner: TenantProvisioner,
    *,
    schemas: Sequence[str] | None = None,
    shared_tables: Iterable[str] = (),
) -> AuditReport:
    """Audit an application as its ``TenantProvisioner`` describes it (``--app``)."""
    strategy = provisioner.strategy
    rls = strategy if isinstance(strategy, RowLevelSecurity) else None
    return await audit(
        provisioner.admin_engine,
        app_role=provisioner.app_role,
        tenant_column=rls.tenant_column if rls is not None else "tenant_id",
        shared_tables={*shared_tables, *(rls.shared_tables if rls is not None else ())},
        schemas=schemas,
        strategy=strategy,
        tenants=await provisioner.list_tenants(),
        registry=provisioner.table,
    )


async def _audit(
    conn: AsyncConnection,
    *,
    app_role: str,
    tenant_column: str,
    shared_tables: Iterable[str],
    schemas: Sequence[str] | None,
    strategy: IsolationStrategy | None,
    tenants: Sequence[Tenant],
    registry: Table | None,
) -> AuditReport:
    database = str(await conn.scalar(text("SELECT current_database()")))
    name = strategy.name if strategy is not None else None
    ids = tuple(t.id for t in tenants)
    if not await conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": app_role}):
        missing = Finding(
            "A001",
            app_role,
            "the application role does not exist, so nothing else can be checked",
            f"CREATE ROLE {quote_ident(app_role)} LOGIN NOSUPERUSER NOBYPASSRLS",
        )
        return AuditReport(app_role, database, name, (missing,), tenants=ids)
    shared = set(shared_tables) | _BOOKKEEPING
    if registry is not None:
        shared |= {registry.name, registry.fullname}
    findings: list[Finding] = []
    inspected: list[str] = []
    async with _transaction(conn):
        if strategy is None or isinstance(strategy, RowLevelSecurity):
            rls = strategy or RowLevelSecurity(tenant_column=tenant_column, shared_tables=shared)
            tables = await catalog_tables(conn, app_role, schemas, rls, shared)
            tenant_tables = [t for t in tables if rls.tenant_column in t.c]
            inspected = [t.fullname for t in [*rls.tenant_tables(), *tenant_tables]]
            findings += await audit_indexes(conn, rls, tables)
            findings += await audit_views(conn, app_role, rls, tables)
            # One pass of the strategy's own checks over its metadata and what the catalog adds
            # (catalog_tables leaves out the tables the metadata already names).
            own = [] if rls.metadata is None else rls.metadata.sorted_tables
            async with _as_role(conn, app_role):
                findings += await rls.check(conn, [*own, *tables])
        elif isinstance(strategy, SchemaPerTenant):
            inspected = [t.name for t in strategy.tenant_tables()]
            findings += await audit_schemas(conn, strategy, tenants, app_role, registry)
            async with _as_role(conn, app_role):
                findings += await strategy.check(conn)
        elif isinstance(strategy, DatabasePerTenant):
            findings += await audit_databases(conn, strategy, tenants)
        elif isinstance(strategy, QueryScoping):
            findings += strategy.check()
        else:
            raise IsolationConfigError(f"the audit does not know the strategy {name!r}")
    return AuditReport(
        app_role,
        database,
        name,
        tuple(_unique(findings)),
        tables=tuple(inspected),
        tenants=ids,
    )


def _unique(findings: Iterable[Finding]) -> list[Finding]:
    """Once each: the strategy's own check and the catalog's overlap on the role."""
    return list(dict.fromkeys(findings))


@asynccontextmanager
async def _connected(target: AsyncEngine | AsyncConnection) -> AsyncIterator[AsyncConnection]:
    if isinstance(target, AsyncConnection):
        yield target
        return
    async with target.connect() as conn:
        yield conn


@asynccontextmanager
async def _transaction(conn: AsyncConnection) -> AsyncIterator[None]:
    """Everything the audit does is rolled back: a savepoint when a transaction is open."""
    transaction = conn.begin_nested() if conn.in_transaction() else conn.begin()
    async with transaction as opened:
        try:
            yield
        finally:
            await opened.rollback()


@asynccontextmanager
async def _as_role(conn: AsyncConnection, role: str) -> AsyncIterator[None]:
    """Act as the application role, with the search_path its own sessions start with."""
    path = await _default_search_path(conn, role)
    async with conn.begin_nested() as savepoint:
        try:
            await conn.execute(text(f"SET LOCAL ROLE {quote_ident(role)}"))
        except DBAPIError:
            raise IsolationConfigError(
                "the audit cannot act as the application role",
                hint="connect as a superuser, or as a role that is a member of the app role",
            ) from None
        await conn.execute(text("SELECT set_config('search_path', :p, true)"), {"p": path})
        yield
        await savepoint.rollback()


async def _default_search_path(conn: AsyncConnection, role: str) -> str:
    """The role's starting search_path: role in this database, role, database, server."""
    row = (
        await conn.execute(
            text(
                "SELECT (SELECT substr(s, 13) FROM pg_db_role_setting d, unnest(d.setconfig) s"
                "  WHERE d.setrole IN (r.oid, 0) AND d.setdatabase IN (db.oid, 0)"
                "  AND s LIKE 'search\\_path=%'"
                "  ORDER BY d.setrole = 0, d.setdatabase = 0 LIMIT 1) AS configured,"
                " (SELECT CASE WHEN source IN ('default', 'configuration file')"
                "  THEN reset_val ELSE boot_val END"
                "  FROM pg_settings WHERE name = 'search_path') AS server"
                " FROM pg_roles r, pg_database db"
                " WHERE r.rolname = :role AND db.datname = current_database()"
            ),
            {"role": role},
        )
    ).one()
    return str(row.configured if row.configured is not None else row.server)
