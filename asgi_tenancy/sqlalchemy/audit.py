"""The isolation audit: read the live catalog and report every way isolation would not hold.

Two modes. Catalog-only (no strategy): every table with the tenant column is a row-level
security tenant table, checked with ``RowLevelSecurity.check`` run as the application role,
plus what that check does not cover (codes ``A001``-``A005``: the role exists, every policy
that applies reads the tenant once per statement, an index leads with the tenant column). With
the application's strategy and tenants: the strategy's own ``check`` as the application role,
then each tenant's schema or database (``audit_placement``). Findings are never raised: the
report lists them all, each with the SQL (or the step) that fixes it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, MetaData, Table, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import NullType

from ..errors import IsolationConfigError
from ..tenant import Tenant
from .audit_placement import audit_databases, audit_schemas
from .database_per_tenant import DatabasePerTenant
from .query_scoping import QueryScoping
from .rls import KEY_SCHEMA, POLICY_NAME, Finding, RowLevelSecurity, _qualified
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
    catalog scan (default: every schema the role may use). ``registry`` is the tenants table:
    shared by definition, and where a fix for a misplaced tenant is written.
    """
    if not isinstance(app_role, str) or not _ROLE.match(app_role):
        raise IsolationConfigError("app_role must be a plain lower-case PostgreSQL role name")
    if isinstance(target, AsyncEngine):
        async with target.connect() as conn:
            return await _audit(
                conn, app_role, tenant_column, shared_tables, schemas, strategy, tenants, registry
            )
    return await _audit(
        target, app_role, tenant_column, shared_tables, schemas, strategy, tenants, registry
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
            tables = await _catalog_tables(conn, app_role, schemas, rls, shared)
            tenant_tables = [t for t in tables if rls.tenant_column in t.c]
            inspected = [t.fullname for t in [*rls.tenant_tables(), *tenant_tables]]
            findings += await _audit_policies(conn, app_role, rls, tables)
            findings += await _audit_indexes(conn, rls, tables)
            findings += await _audit_views(conn, app_role, rls, tables)
            async with _as_role(conn, app_role):
                if strategy is not None:
                    findings += await strategy.check(conn)
                findings += await rls.check(conn, tables)
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


async def _catalog_tables(
    conn: AsyncConnection,
    role: str,
    schemas: Sequence[str] | None,
    rls: RowLevelSecurity,
    shared: set[str],
) -> list[Table]:
    """The tables the role can reach, as column-only ``Table`` stubs for ``rls.check``.

    Tables the application's metadata already names are left to ``strategy.check``.
    """
    rows = (
        await conn.execute(
            text(
                "SELECT n.nspname AS schema, c.relname AS name,"
                " array_agg(a.attname::text ORDER BY a.attnum) AS columns"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
                " AND NOT a.attisdropped"
                " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%'"
                " AND n.nspname NOT IN ('information_schema', :private)"
                " AND has_schema_privilege(:role, n.oid, 'USAGE')"
                " GROUP BY n.nspname, c.relname ORDER BY n.nspname, c.relname"
            ),
            {"role": role, "private": KEY_SCHEMA},
        )
    ).all()
    known = set()
    if rls.metadata is not None:
        known = {(t.schema or "public", t.name) for t in rls.metadata.sorted_tables}
    metadata = MetaData()
    tables = []
    for row in rows:
        skip = (
            (schemas is not None and row.schema not in schemas)
            or (row.schema, row.name) in known
            or row.name in shared
            or f"{row.schema}.{row.name}" in shared
        )
        if not skip:
            columns = [Column(c, NullType()) for c in row.columns]
            tables.append(Table(row.name, metadata, *columns, schema=row.schema))
    return tables


async def _audit_policies(
    conn: AsyncConnection, role: str, rls: RowLevelSecurity, tables: Sequence[Table]
) -> list[Finding]:
    """A002-A004: each permissive policy that applies to the role must confine to the tenant,
    reading it once per statement. Restrictive policies only narrow, so they pass."""
    tenant_tables = [t for t in tables if rls.tenant_column in t.c]
    tenant_tables += rls.tenant_tables()
    if not tenant_tables:
        return []
    ids = (
        await conn.execute(
            text(
                "SELECT (SELECT array_agg(oid::int) FROM pg_proc WHERE proname = 'current_setting'"
                " AND pronamespace = 'pg_catalog'::regnamespace) AS setting,"
                " to_regprocedure(:function)::oid::int AS function"
            ),
            {"function": f"{rls.function}()"},
        )
    ).one()
    reader = _TenantReader(set(ids.setting or ()), ids.function, rls.setting)
    findings: list[Finding] = []
    for table in tenant_tables:
        name = _qualified(table)
        policies = (
            await conn.execute(
                text(
                    "SELECT p.polname, pg_get_expr(p.polqual, p.polrelid) AS using_sql,"
                    " p.polqual::text AS using_tree,"
                    " pg_get_expr(p.polwithcheck, p.polrelid) AS check_sql,"
                    " p.polwithcheck::text AS check_tree"
                    " FROM pg_policy p WHERE p.polrelid = to_regclass(:name) AND p.polpermissive"
                    " AND (0 = ANY(p.polroles) OR EXISTS (SELECT 1 FROM unnest(p.polroles) r"
                    "  WHERE pg_has_role(:role, r, 'MEMBER')))"
                    " ORDER BY p.polname"
                ),
                {"name": name, "role": role},
            )
        ).all()
        for policy in policies:
            finding = reader.judge(policy)
            if finding is not None:
                code, message = finding
                subject = f"{name} policy {quote_ident(policy.polname)}"
                fix = _policy_fix(rls, table, policy.polname)
                findings.append(Finding(code, subject, message, fix))
    return findings


class _TenantReader:
    """Judges a policy's expressions from their parse trees (``pg_node_tree`` text).

    A call to ``current_setting`` outside a sub-SELECT (a SUBLINK node) runs once per row;
    inside one it is an InitPlan, run once per statement. The tenant function is STABLE and
    raises when unbound, so a direct call to it is accepted.
    """

    _TOKEN = re.compile(r"\\.|\{([A-Z_0-9]+)|\}|:funcid (\d+)")

    def __init__(self, setting_ids: set[int], function_id: int | None, setting: str) -> None:
        self.setting_ids = setting_ids
        self.function_id = function_id
        self.literal = f"'{setting}'"

    def calls(self, tree: str) -> list[tuple[int, bool]]:
        """``(function oid, inside a sub-SELECT)`` for every function call in ``tree``."""
        stack: list[str] = []
        found = []
        for match in self._TOKEN.finditer(tree):
            node, funcid = match.group(1), match.group(2)
            if node is not None:
                stack.append(node)
            elif funcid is not None:
                found.append((int(funcid), "SUBLINK" in stack))
            elif match.group(0) == "}" and stack:
                stack.pop()
        return found

    def reads_tenant(self, sql: str, tree: str) -> bool:
        ids = {funcid for funcid, _ in self.calls(tree)}
        if self.function_id is not None and self.function_id in ids:
            return True
        return bool(ids & self.setting_ids) and self.literal in sql

    def per_row(self, tree: str) -> bool:
        return any(f in self.setting_ids and not sub for f, sub in self.calls(tree))

    def judge(self, policy: Any) -> tuple[str, str] | None:
        pairs = ((policy.using_sql, policy.using_tree), (policy.check_sql, policy.check_tree))
        expressions = [(sql, tree) for sql, tree in pairs if sql is not None]
        if any(sql.strip() == "true" for sql, _ in expressions):
            return "A002", (
                "a permissive policy admits every row: permissive policies are OR-ed, so it "
                "opens the table to every tenant"
            )
        if not all(self.reads_tenant(sql, tree) for sql, tree in expressions):
            return "A003", (
                f"a permissive policy reads neither {self.literal} nor the tenant function, "
                "so it does not confine rows to the bound tenant"
            )
        if any(self.per_row(tree) for _, tree in expressions):
            return "A004", (
                "the policy calls current_setting() once per row; wrap it in a scalar "
                "sub-SELECT (or use the tenant function) so it runs once per statement"
            )
        return None


def _policy_fix(rls: RowLevelSecurity, table: Table, policy: str) -> str:
    statements = rls.table_ddl(table)
    if policy != POLICY_NAME:
        statements.insert(0, f"DROP POLICY IF EXISTS {quote_ident(policy)} ON {_qualified(table)}")
    return ";\n".join(statements)


async def _audit_indexes(
    conn: AsyncConnection, rls: RowLevelSecurity, tables: Sequence[Table]
) -> list[Finding]:
    """A005: without an index led by the tenant column every query scans the whole table."""
    findings = []
    for table in [*[t for t in tables if rls.tenant_column in t.c], *rls.tenant_tables()]:
        name = _qualified(table)
        indexed = await conn.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a"
                " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
                " WHERE i.indrelid = to_regclass(:name) AND a.attname = :column)"
                " OR to_regclass(:name) IS NULL"
            ),
            {"name": name, "column": rls.tenant_column},
        )
        if not indexed:
            create = [s for s in rls.table_ddl(table) if s.startswith("CREATE INDEX")]
            findings.append(
                Finding(
                    "A005",
                    name,
                    f"no index starts with {rls.tenant_column}: every tenant's query scans "
                    "every tenant's rows",
                    ";\n".join(create),
                )
            )
    return findings


async def _audit_views(
    conn: AsyncConnection, role: str, rls: RowLevelSecurity, tables: Sequence[Table]
) -> list[Finding]:
    """A012: a view reads its tables with its owner's rights, under the owner's policies (none
    for a superuser, a BYPASSRLS role, or the owner of a table whose RLS is not forced); a
    materialized view holds every tenant's rows with no policy at all."""
    names = [_qualified(t) for t in [*rls.tenant_tables(), *tables] if rls.tenant_column in t.c]
    if not names:
        return []
    rows = await conn.execute(
        text(
            "SELECT DISTINCT format('%I.%I', n.nspname, v.relname) AS name,"
            " v.relkind::text AS relkind"
            " FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace"
            " JOIN pg_rewrite w ON w.ev_class = v.oid"
            " JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid"
            " AND d.refclassid = 'pg_class'::regclass"
            " WHERE v.relkind IN ('v', 'm') AND d.refobjid <> v.oid"
            " AND d.refobjid = ANY(SELECT to_regclass(t) FROM unnest(CAST(:names AS text[])) t)"
            " AND NOT coalesce('security_invoker=true' = ANY(v.reloptions), false)"
            " AND has_schema_privilege(:role, n.oid, 'USAGE')"
            " AND has_table_privilege(:role, v.oid, 'SELECT')"
            " ORDER BY 1"
        ),
        {"names": names, "role": role},
    )
    findings = []
    for row in rows:
        if row.relkind == "m":
            message = "a materialized view of a tenant table holds every tenant's rows"
            fix = f"REVOKE ALL ON {row.name} FROM {quote_ident(role)}"
        else:
            message = "a view of a tenant table reads it with its owner's rights, not the caller's"
            fix = f"ALTER VIEW {row.name} SET (security_invoker = true)"
        findings.append(Finding("A012", row.name, message, fix))
    return findings
