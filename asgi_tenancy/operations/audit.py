"""The isolation audit: read the live catalog and report every way isolation would not hold.

Two modes. Catalog-only (no strategy, or ``catalog="row" | "schema" | "database"``): what the
catalog alone shows. ``row``: every table with the tenant column is a row-level security tenant
table; ``schema``: every schema carrying a tenant's marker comment is that tenant's, its tables
the tenant tables; ``database``: every database carrying a marker is a tenant's, read with the
admin's URL for the application role's grants. With the application's strategy and tenants:
whatever that strategy's ``audit()`` reports (its own checks as the application role, then where
each tenant lives), and across tenants, which one is at another Alembic revision than the rest
(A008). Findings are never raised: the report lists them all, each with its fix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..checks import Finding
from ..errors import IsolationConfigError
from ..sqlalchemy.placement import UNREADABLE, AuditContext
from ..sqlalchemy.postgres import quote_ident
from ..sqlalchemy.rls import RowLevelSecurity
from ..sqlalchemy.strategy import IsolationStrategy
from ..tenant import Tenant
from .catalog import catalog_databases, catalog_schemas

if TYPE_CHECKING:
    from .provisioning import TenantProvisioner

__all__ = ["AuditReport", "audit", "audit_provisioner", "compare_revisions"]

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


#: The catalog-only audits, by strategy name (``asgi-tenancy audit URL --strategy``).
CATALOG_STRATEGIES = ("row", "schema", "database")


async def audit(
    target: AsyncEngine | AsyncConnection,
    *,
    app_role: str | None = None,
    catalog: str = "row",
    tenant_column: str = "tenant_id",
    shared_tables: Iterable[str] = (),
    schemas: Sequence[str] | None = None,
    strategy: IsolationStrategy | None = None,
    tenants: Sequence[Tenant] = (),
    registry: Table | None = None,
) -> AuditReport:
    """Audit the database ``target`` reaches for the application role ``app_role`` (default:
    the role ``target`` connects as).

    Connect as an owner or superuser that may ``SET ROLE`` to ``app_role``: the strategy
    checks run as that role, in a transaction that is rolled back. Without ``strategy`` the
    audit reads the catalog as ``catalog`` names (``CATALOG_STRATEGIES``). ``schemas`` limits the
    catalog scan (default: every schema the role may use). ``tenant_column`` is for the
    catalog-only audit: a ``RowLevelSecurity`` strategy brings its own. ``registry`` is the
    tenants table: shared by definition, and where a fix for a misplaced tenant is written.
    """
    if app_role is not None and (not isinstance(app_role, str) or not _ROLE.match(app_role)):
        raise IsolationConfigError("app_role must be a plain lower-case PostgreSQL role name")
    if strategy is None and catalog not in CATALOG_STRATEGIES:
        raise IsolationConfigError(
            "the catalog-only audit knows the strategies row, schema and database"
        )
    async with _connected(target) as conn:
        if app_role is None:
            app_role = str(await conn.scalar(text("SELECT current_user")))
        return await _audit(
            conn,
            app_role=app_role,
            catalog=catalog,
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
    return await audit(
        provisioner.admin_engine,
        app_role=provisioner.app_role,
        shared_tables=shared_tables,
        schemas=schemas,
        strategy=provisioner.strategy,
        tenants=await provisioner.list_tenants(),
        registry=provisioner.table,
    )


async def _audit(
    conn: AsyncConnection,
    *,
    app_role: str,
    catalog: str,
    tenant_column: str,
    shared_tables: Iterable[str],
    schemas: Sequence[str] | None,
    strategy: IsolationStrategy | None,
    tenants: Sequence[Tenant],
    registry: Table | None,
) -> AuditReport:
    database = str(await conn.scalar(text("SELECT current_database()")))
    name = strategy.name if strategy is not None else None
    if not await conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": app_role}):
        missing = Finding(
            "A001",
            app_role,
            "the application role does not exist, so nothing else can be checked",
            f"CREATE ROLE {quote_ident(app_role)} LOGIN NOSUPERUSER NOBYPASSRLS",
        )
        return AuditReport(
            app_role, database, name, (missing,), tenants=tuple(t.id for t in tenants)
        )
    shared = set(shared_tables) | _BOOKKEEPING
    if registry is not None:
        shared |= {registry.name, registry.fullname}
    if strategy is None and catalog == "schema":
        strategy, tenants = await catalog_schemas(conn)
        name = strategy.name
    elif strategy is None and catalog == "database":
        strategy, tenants = await catalog_databases(conn, app_role)
        name = strategy.name
    elif strategy is None:
        strategy = RowLevelSecurity(tenant_column=tenant_column, shared_tables=shared)
    ids = tuple(t.id for t in tenants)
    context = AuditContext(
        conn=conn,
        app_role=app_role,
        tenants=tenants,
        registry=registry,
        schemas=schemas,
        shared_tables=frozenset(shared),
        as_app_role=lambda: _as_role(conn, app_role),
    )
    async with _transaction(conn):
        findings = await strategy.audit(context)
    findings += compare_revisions(context.revisions, context.revision_kind)
    return AuditReport(
        app_role,
        database,
        name,
        tuple(_unique(findings)),
        tables=tuple(context.inspected),
        tenants=ids,
    )


def compare_revisions(revisions: Mapping[str, str | None], what: str) -> list[Finding]:
    """A008: every schema or database at the revision most of them are at.

    Nothing is reported when none has an ``alembic_version`` table (no Alembic in use).
    """
    known = Counter(r for r in revisions.values() if r not in (None, UNREADABLE))
    if not known:
        return []
    reference = sorted(known.items(), key=lambda item: (-item[1], item[0]))[0][0]
    return [
        Finding(
            "A008",
            subject,
            f"the {what} is at revision {revision or '(none)'} while the others are at "
            f"{reference}: a query for one tenant's model may not match its tables",
            f"upgrade this {what} to {reference} (alembic upgrade, asgi-tenancy migrate)",
        )
        for subject, revision in revisions.items()
        if revision != reference
    ]


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
