"""RowLevelSecurity: shared tables, one policy, the tenant in a transaction-local setting.

The policy reads the tenant through ``(SELECT <schema>.tenancy_current_tenant())``: a scalar
sub-SELECT is evaluated once per statement (an InitPlan), not once per row, and the function
raises when the setting is missing or empty, so a transaction nobody bound fails loudly at the
database instead of quietly returning nothing. RLS is ENABLEd and FORCEd so the table owner is
held to it too, and the policy has an explicit WITH CHECK so writes are confined like reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from ..errors import IsolationConfigError
from ..tenant import Tenant
from .criteria import CRITERIA_KEY, TenantCriteria
from .strategy import IsolationStrategy, quote_literal
from .strategy import quote_ident as _quote

if TYPE_CHECKING:
    from .database import TenantDatabase

__all__ = ["Finding", "RowLevelSecurity"]

_SETTING = re.compile(r"[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*\Z")
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
POLICY_NAME = "tenancy_isolation"


@dataclass(frozen=True)
class Finding:
    """One reason isolation would not hold: a stable code, the object, and how to fix it."""

    code: str
    subject: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.subject}: {self.message} (fix: {self.fix})"


class RowLevelSecurity(IsolationStrategy):
    """Isolation by PostgreSQL row-level security on tables shared by all tenants.

    ``metadata`` lists the application's tables: those with ``tenant_column`` are tenant
    tables (policy, index, checks); the others must be named in ``shared_tables``.
    """

    name = "row"

    def __init__(
        self,
        *,
        metadata: MetaData | None = None,
        tenant_column: str = "tenant_id",
        shared_tables: Iterable[str] = (),
        setting: str = "app.tenant_id",
        function_schema: str = "public",
        orm_criteria: bool = True,
    ) -> None:
        if not _SETTING.match(setting):
            raise IsolationConfigError(
                "the tenant setting must look like 'prefix.name' (lower case)",
                hint="the default 'app.tenant_id' works",
            )
        for ident in (tenant_column, function_schema):
            if not _IDENT.match(ident):
                raise IsolationConfigError("tenant column and function schema must be plain names")
        self.metadata = metadata
        self.tenant_column = tenant_column
        self.shared_tables = frozenset(shared_tables)
        self.setting = setting
        self.function = f"{_quote(function_schema)}.tenancy_current_tenant"
        self._criteria = TenantCriteria(tenant_column) if orm_criteria else None
        self._bindings: dict[str, str] = {}

    # -- binding ---------------------------------------------------------------------------

    def binding_sql(self, tenant: Tenant) -> str:
        sql = self._bindings.get(tenant.id)
        if sql is None:
            sql = f"SELECT set_config('{self.setting}', {quote_literal(tenant.id)}, true)"
            if len(self._bindings) >= 10_000:  # bound: 10,000 tenants' strings, ~1 MB
                self._bindings.clear()
            self._bindings[tenant.id] = sql
        return sql

    def configure_session(self, session: Session, tenant: Tenant) -> None:
        if self._criteria is not None:
            session.info[CRITERIA_KEY] = self._criteria

    # -- DDL -------------------------------------------------------------------------------

    def tenant_tables(self) -> list[Table]:
        if self.metadata is None:
            return []
        return [t for t in self.metadata.sorted_tables if self.tenant_column in t.c]

    def function_ddl(self) -> str:
        return f"""CREATE OR REPLACE FUNCTION {self.function}() RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $tenancy$
DECLARE tenant text := current_setting('{self.setting}', true);
BEGIN
  IF tenant IS NULL OR tenant = '' THEN
    RAISE EXCEPTION 'asgi-tenancy: no tenant is bound to this transaction'
      USING ERRCODE = '42501', HINT = 'open sessions through TenantDatabase.session()';
  END IF;
  RETURN tenant;
END
$tenancy$"""

    def table_ddl(self, table: Table) -> list[str]:
        """ENABLE + FORCE, the policy with USING and WITH CHECK, the tenant index."""
        name = _qualified(table)
        column = _quote(self.tenant_column)
        predicate = f"{column} = (SELECT {self.function}())"
        index = _quote(f"ix_{table.name}_{self.tenant_column}"[:63])
        return [
            f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
            f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS {POLICY_NAME} ON {name}",
            f"CREATE POLICY {POLICY_NAME} ON {name} AS PERMISSIVE FOR ALL "
            f"USING ({predicate}) WITH CHECK ({predicate})",
            f"CREATE INDEX IF NOT EXISTS {index} ON {name} ({column})",
        ]

    def ddl(self, tables: Sequence[Table] | None = None) -> list[str]:
        """Every statement the set-up needs, in order; ``op.execute`` each in an Alembic step."""
        statements = [self.function_ddl()]
        for table in self.tenant_tables() if tables is None else tables:
            statements.extend(self.table_ddl(table))
        return statements

    async def install(self, admin: AsyncConnection, tables: Sequence[Table] | None = None) -> None:
        """Run ``ddl()`` on an admin (table owner) connection."""
        for statement in self.ddl(tables):
            await admin.execute(text(statement))

    # -- start-up validation ---------------------------------------------------------------

    async def validate(self, database: TenantDatabase) -> None:
        async with database.engine.connect() as conn:
            findings = await self.check(conn)
        if findings:
            raise IsolationConfigError(
                "row-level security would not hold: " + "; ".join(str(f) for f in findings),
                hint=findings[0].fix,
            )

    async def check(self, conn: AsyncConnection) -> list[Finding]:
        """Every finding on the live database, read as the application's role."""
        findings = await _check_role(conn)
        findings += await self._check_function(conn)
        tenant_tables = self.tenant_tables()
        if self.metadata is not None:
            findings += _check_unclassified(self.metadata, self.tenant_column, self.shared_tables)
        for table in tenant_tables:
            findings += await self._check_table(conn, table)
        return findings

    async def _check_function(self, conn: AsyncConnection) -> list[Finding]:
        exists = await conn.scalar(
            text("SELECT to_regprocedure(:sig) IS NOT NULL"), {"sig": f"{self.function}()"}
        )
        if exists:
            return []
        return [
            Finding(
                "R010",
                self.function,
                "the tenant function is missing",
                "run RowLevelSecurity.install() (or the SQL of ddl()) as the table owner",
            )
        ]

    async def _check_table(self, conn: AsyncConnection, table: Table) -> list[Finding]:
        name = _qualified(table)
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
        fix = "; ".join(self.table_ddl(table))
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
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        )
    ).one()
    findings = []
    if row.rolsuper:
        findings.append(
            Finding(
                "R001",
                "current_user",
                "the application connects as a superuser, which bypasses every policy",
                "connect as a role created with NOSUPERUSER",
            )
        )
    if row.rolbypassrls:
        findings.append(
            Finding(
                "R002",
                "current_user",
                "the application role has BYPASSRLS",
                "ALTER ROLE <app role> NOBYPASSRLS",
            )
        )
    return findings


def _check_unclassified(metadata: MetaData, column: str, shared: frozenset[str]) -> list[Finding]:
    return [
        Finding(
            "R011",
            table.fullname,
            "table has no tenant column and is not declared shared",
            f"add a {column} column, or list it in shared_tables",
        )
        for table in metadata.sorted_tables
        if column not in table.c and table.name not in shared and table.fullname not in shared
    ]


def _qualified(table: Table) -> str:
    if table.schema:
        return f"{_quote(table.schema)}.{_quote(table.name)}"
    return _quote(table.name)
