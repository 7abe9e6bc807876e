"""The isolation audit for row-level security, beyond what ``RowLevelSecurity.check`` covers.

``check`` knows the tables of the application's metadata; here the catalog's tables join them,
and what a start-up check does not judge is judged: whether each policy that applies to the
application role really confines rows to the bound tenant, once per statement (A002-A004),
whether an index serves the tenant predicate (A005), and whether a view reads around the
policies (A012).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import NullType

from .rls import KEY_SCHEMA, POLICY_NAME, Finding, RowLevelSecurity, _qualified
from .strategy import quote_ident

__all__ = ["audit_indexes", "audit_policies", "audit_views", "catalog_tables"]


async def catalog_tables(
    conn: AsyncConnection,
    role: str,
    schemas: Sequence[str] | None,
    rls: RowLevelSecurity,
    shared: set[str],
) -> list[Table]:
    """The tables the role can reach, as column-only ``Table`` stubs for ``rls.check``.

    Partitions are included: one queried directly is held to its own policies only. Tables
    the application's metadata already names are left to ``strategy.check``.
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


async def audit_policies(
    conn: AsyncConnection, role: str, rls: RowLevelSecurity, tables: Sequence[Table]
) -> list[Finding]:
    """A002-A004: each permissive policy that applies to the role must confine to the tenant,
    reading it once per statement. Restrictive policies only narrow, so they pass."""
    unique = {_qualified(t): t for t in [*tables, *rls.tenant_tables()]}
    tenant_tables = [t for t in unique.values() if rls.tenant_column in t.c]
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


async def audit_indexes(
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


async def audit_views(
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
