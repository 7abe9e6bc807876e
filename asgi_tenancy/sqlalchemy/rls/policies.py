"""The judge of row-level security policies (A002-A004): start-up validation and the audit.

Permissive policies are OR-ed, so one ``USING (true)`` beside the library's opens the table.
Each permissive policy that applies to the application role is judged from its parse tree
(``pg_node_tree``): it must read the bound tenant, and once per statement. Restrictive
policies only narrow what permissive ones allow, so they pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...checks import Finding
from ..postgres import qualified, quote_ident

if TYPE_CHECKING:
    from .strategy import RowLevelSecurity

__all__ = ["POLICY_NAME", "audit_policies"]

#: The name of the library's own policy on every tenant table.
POLICY_NAME = "tenancy_isolation"


async def audit_policies(
    conn: AsyncConnection,
    role: str,
    rls: RowLevelSecurity,
    tables: Sequence[Table],
    blocked: Set[str] = frozenset(),
) -> list[Finding]:
    """A002-A004: each permissive policy that applies to the role must confine to the tenant,
    reading it once per statement. Restrictive policies only narrow, so they pass. Tables in
    the ``blocked`` schemas (no USAGE: R021) cannot be looked up and are left out."""
    everything = [*tables, *rls.tenant_tables()]
    unique = {qualified(t): t for t in everything if t.schema not in blocked}
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
        name = qualified(table)
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
        statements.insert(0, f"DROP POLICY IF EXISTS {quote_ident(policy)} ON {qualified(table)}")
    return ";\n".join(statements)
