"""The start-up checks of row-level security (R001-R022, A002-A004, A012), read as the
application's role.

Each check is a small function returning ``Finding``s with a stable code and the SQL that
fixes it; ``check`` runs them all. ``validate()`` refuses to serve on any finding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...checks import Finding
from ..grants import GrantCodes, check_grants, names_of, unusable_schemas
from ..postgres import qualified, quote_ident, superuser_fix
from .policies import audit_policies
from .signing_checks import check_signer

if TYPE_CHECKING:
    from .strategy import RowLevelSecurity

__all__ = ["check"]


async def check(
    rls: RowLevelSecurity, conn: AsyncConnection, tables: Sequence[Table] | None = None
) -> list[Finding]:
    """Every finding on the live database, read as the application's role.

    ``tables`` replaces the metadata's tables (the isolation audit passes the catalog's).
    """
    findings = await _check_role(conn)
    findings += await _check_temporary(conn)
    findings += await _check_function(rls, conn)
    if rls.signer is not None and not findings:
        findings += await check_signer(rls.signer, conn)
    if tables is None:
        tables = [] if rls.metadata is None else rls.metadata.sorted_tables
    findings += _check_unclassified(tables, rls.tenant_column, rls.shared_tables)
    tenant = [t for t in tables if rls.tenant_column in t.c]
    # A table in a schema the role may not use cannot even be looked up: R021 says so.
    blocked = await unusable_schemas(conn, {t.schema for t in tables if t.schema is not None})
    checked = [t for t in tenant if t.schema not in blocked]
    for table in checked:
        findings += await _check_table(rls, conn, table)
    findings += await _check_unregistered(rls, conn, {qualified(t) for t in checked})
    findings += await _check_views(rls, conn, checked)
    findings += await _check_policies(rls, conn, checked, blocked)
    shared = [t for t in tables if t not in tenant and _declared(t, rls.shared_tables)]
    findings += await check_grants(
        conn, _GRANTS, tenant_tables=names_of(tenant), shared_tables=names_of(shared)
    )
    return findings


_GRANTS = GrantCodes(table="R021", sequence="R022")


def _declared(table: Table, shared: frozenset[str]) -> bool:
    return table.name in shared or table.fullname in shared


async def _check_policies(
    rls: RowLevelSecurity, conn: AsyncConnection, tables: Sequence[Table], blocked: set[str]
) -> list[Finding]:
    """A002-A004: every permissive policy that applies to this role confines to the tenant.

    Permissive policies are ORed, so one ``USING (true)`` beside ours opens the table; the
    judgement (from the parsed policy expressions) is shared with the isolation audit.
    """
    role = str(await conn.scalar(text("SELECT current_user")))
    return await audit_policies(conn, role, rls, tables, blocked)


async def _check_unregistered(
    rls: RowLevelSecurity, conn: AsyncConnection, known: set[str]
) -> list[Finding]:
    """Tables the app role can reach that have the tenant column but no forced RLS.

    The application's metadata cannot name a table a migration forgot, or one created by
    hand; the catalog can. Tables the role holds no privilege on are out of its reach, and
    tables declared in ``shared_tables`` are the application's explicit choice.
    """
    rows = await conn.execute(
        text(
            "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = :column"
            "  AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.relkind IN ('r', 'p')"
            " AND NOT (c.relrowsecurity AND c.relforcerowsecurity)"
            " AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'"
            " AND has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')"
            " AND c.oid NOT IN (SELECT to_regclass(k) FROM unnest(CAST(:known AS text[])) k"
            "  WHERE to_regclass(k) IS NOT NULL)"
            " ORDER BY 1, 2"
        ),
        {"column": rls.tenant_column, "known": sorted(known)},
    )
    findings = []
    for row in rows:
        name = f"{row.schema}.{row.name}"
        if row.name in rls.shared_tables or name in rls.shared_tables:
            continue  # declared shared: the application's explicit choice
        quoted = f"{quote_ident(row.schema)}.{quote_ident(row.name)}"
        findings.append(
            Finding(
                "R015",
                name,
                f"the app role can reach this table with a {rls.tenant_column} column and"
                " no forced row-level security; it is not in the application's metadata",
                f"add it to the metadata and install its policy, or REVOKE ALL ON {quoted}"
                f" FROM the application role",
            )
        )
    return findings


async def _check_views(
    rls: RowLevelSecurity, conn: AsyncConnection, tables: Sequence[Table]
) -> list[Finding]:
    """A012: a view reads its tables with its owner's rights, under the owner's policies (none
    for a superuser, a BYPASSRLS role, or the owner of a table whose RLS is not forced), unless
    it is ``security_invoker``; a materialized view holds every tenant's rows with no policy at
    all. Judged for the views the current role can read (the isolation audit runs it as the
    app role too)."""
    names = [qualified(t) for t in tables if rls.tenant_column in t.c]
    if not names:
        return []
    rows = await conn.execute(
        text(
            "SELECT DISTINCT format('%I.%I', n.nspname, v.relname) AS name,"
            " v.relkind::text AS relkind, current_user AS role"
            " FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace"
            " JOIN pg_rewrite w ON w.ev_class = v.oid"
            " JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid"
            " AND d.refclassid = 'pg_class'::regclass"
            " WHERE v.relkind IN ('v', 'm') AND d.refobjid <> v.oid"
            " AND d.refobjid = ANY(SELECT to_regclass(t) FROM unnest(CAST(:names AS text[])) t)"
            " AND NOT EXISTS (SELECT 1 FROM unnest(v.reloptions) o WHERE lower(o) IN"
            "  ('security_invoker=true', 'security_invoker=on', 'security_invoker=1',"
            "   'security_invoker=yes'))"
            " AND has_schema_privilege(n.oid, 'USAGE')"
            " AND has_table_privilege(v.oid, 'SELECT')"
            " ORDER BY 1"
        ),
        {"names": names},
    )
    findings = []
    for row in rows:
        if row.relkind == "m":
            message = "a materialized view of a tenant table holds every tenant's rows"
            fix = f"REVOKE ALL ON {row.name} FROM {quote_ident(row.role)}"
        else:
            message = "a view of a tenant table reads it with its owner's rights, not the caller's"
            fix = f"ALTER VIEW {row.name} SET (security_invoker = true)"
        findings.append(Finding("A012", row.name, message, fix))
    return findings


async def _check_function(rls: RowLevelSecurity, conn: AsyncConnection) -> list[Finding]:
    exists = await conn.scalar(
        text("SELECT to_regprocedure(:sig) IS NOT NULL"), {"sig": f"{rls.function}()"}
    )
    if exists:
        return []
    return [
        Finding(
            "R010",
            rls.function,
            "the tenant function is missing",
            "run RowLevelSecurity.install() (or the SQL of ddl()) as the table owner",
        )
    ]


async def _check_table(rls: RowLevelSecurity, conn: AsyncConnection, table: Table) -> list[Finding]:
    name = qualified(table)
    row = (
        await conn.execute(
            text(
                "SELECT c.relrowsecurity, c.relforcerowsecurity,"
                " pg_has_role(current_user, c.relowner, 'USAGE') AS owns"
                " FROM pg_class c WHERE c.oid = to_regclass(:name)"
            ),
            {"name": name},
        )
    ).one_or_none()
    if row is None:
        return [Finding("R008", name, "tenant table does not exist", "create it")]
    fix = "; ".join(rls.table_ddl(table))
    findings = []
    if row.owns:
        findings.append(
            Finding(
                "R003",
                name,
                "the application role owns the table (or is a member of its owner)",
                "create tables as another role and grant the app role DML only",
            )
        )
    if not row.relrowsecurity:
        findings.append(Finding("R004", name, "row-level security is not enabled", fix))
    if not row.relforcerowsecurity:
        findings.append(Finding("R005", name, "row-level security is not forced", fix))
    policies = (
        await conn.execute(
            text(
                "SELECT polname, polcmd::text AS polcmd, polpermissive,"
                " polqual IS NOT NULL AS has_using, polwithcheck IS NOT NULL AS has_check"
                " FROM pg_policy WHERE polrelid = to_regclass(:name)"
            ),
            {"name": name},
        )
    ).all()
    if not policies:
        findings.append(Finding("R006", name, "no policy on the table", fix))
    for policy in policies:
        if policy.polcmd in ("*", "a", "w") and not policy.has_check:
            findings.append(
                Finding("R007", name, f"policy {policy.polname} has no WITH CHECK", fix)
            )
    return findings


async def _check_role(conn: AsyncConnection) -> list[Finding]:
    row = (
        await conn.execute(
            text(
                "SELECT rolname, rolsuper, rolbypassrls, oid = 10 AS bootstrap"
                " FROM pg_roles WHERE rolname = current_user"
            )
        )
    ).one()
    role = quote_ident(row.rolname)
    findings = []
    if row.rolsuper:
        findings.append(
            Finding(
                "R001",
                row.rolname,
                "the application connects as a superuser, which bypasses every policy",
                superuser_fix(row.rolname, bootstrap=row.bootstrap),
            )
        )
    if row.rolbypassrls:
        findings.append(
            Finding(
                "R002",
                row.rolname,
                "the application role has BYPASSRLS",
                f"ALTER ROLE {role} NOBYPASSRLS",
            )
        )
    return findings


def _check_unclassified(
    tables: Iterable[Table], column: str, shared: frozenset[str]
) -> list[Finding]:
    return [
        Finding(
            "R011",
            table.fullname,
            "table has no tenant column and is not declared shared",
            f"add a {column} column, or list it in shared_tables",
        )
        for table in tables
        if column not in table.c and not _declared(table, shared)
    ]


async def _check_temporary(conn: AsyncConnection) -> list[Finding]:
    """R018: temporary objects outlive a transaction on a pooled connection, and one named like
    a tenant table shadows it (``pg_temp`` is searched first)."""
    row = (
        await conn.execute(
            text(
                "SELECT current_user AS role, current_database() AS db,"
                " has_database_privilege(current_database(), 'TEMPORARY') AS temp"
            )
        )
    ).one()
    if not row.temp:
        return []
    return [
        Finding(
            "R018",
            row.role,
            "the application role may create temporary tables, which outlive a transaction on "
            "a pooled connection and can shadow tenant tables",
            f"REVOKE TEMPORARY ON DATABASE {quote_ident(row.db)} FROM PUBLIC,"
            f" {quote_ident(row.role)}",
        )
    ]
