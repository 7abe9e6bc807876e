"""RowLevelSecurity: shared tables, one policy, the tenant in a transaction-local setting.

The policy reads the tenant through ``(SELECT <schema>.tenancy_current_tenant())``: a scalar
sub-SELECT is evaluated once per statement (an InitPlan), not once per row, and the function
raises when the setting is missing or empty, so a transaction nobody bound fails loudly at the
database instead of quietly returning nothing. RLS is ENABLEd and FORCEd so the table owner is
held to it too, and the policy has an explicit WITH CHECK so writes are confined like reads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from .._keys import secret_keys
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
        signed: bool = False,
        signing_keys: Sequence[str | bytes] = (),
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
        self.signed = signed
        self.binds_to_backend = signed
        self._keys = _signing_keys(signed, signing_keys)
        self._signed_bindings: dict[tuple[str, int], str] = {}

    # -- binding ---------------------------------------------------------------------------

    def binding_sql(self, tenant: Tenant) -> str:
        sql = self._bindings.get(tenant.id)
        if sql is None:
            sql = f"SELECT set_config('{self.setting}', {quote_literal(tenant.id)}, true)"
            if len(self._bindings) >= 10_000:  # bound: 10,000 tenants' strings, ~1 MB
                self._bindings.clear()
            self._bindings[tenant.id] = sql
        return sql

    def backend_binding_sql(self, tenant: Tenant, backend_pid: int) -> str:
        """Signed: ``tenant:mac`` where the MAC covers the tenant and this server process."""
        if not self.signed:
            return self.binding_sql(tenant)
        key = (tenant.id, backend_pid)
        sql = self._signed_bindings.get(key)
        if sql is None:
            token = f"{tenant.id}:{binding_mac(self._keys[0], tenant.id, backend_pid)}"
            sql = f"SELECT set_config('{self.setting}', '{token}', true)"
            if len(self._signed_bindings) >= 10_000:  # bound: 10,000 tenant x backend pairs
                self._signed_bindings.clear()
            self._signed_bindings[key] = sql
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
        if self.signed:
            return self._signed_function_ddl()
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

    def _signed_function_ddl(self) -> str:
        # SECURITY DEFINER: runs as the owner, the only role that can read the keys. The MAC is
        # sha256(k || sha256(k || message)) with PostgreSQL's built-in sha256() (no pgcrypto):
        # the outer hash over a secret prefix closes the length-extension hole of a single one.
        return f"""CREATE OR REPLACE FUNCTION {self.function}() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL SAFE
SET search_path = pg_catalog, pg_temp AS $tenancy$
DECLARE
  bound text := current_setting('{self.setting}', true);
  tenant text;
  message bytea;
  k bytea;
BEGIN
  IF bound IS NULL OR bound = '' THEN
    RAISE EXCEPTION 'asgi-tenancy: no tenant is bound to this transaction'
      USING ERRCODE = '42501', HINT = 'open sessions through TenantDatabase.session()';
  END IF;
  tenant := split_part(bound, ':', 1);
  message := convert_to(tenant || ':' || pg_backend_pid()::text, 'UTF8');
  FOR k IN SELECT secret FROM {KEY_TABLE} LOOP
    IF encode(sha256(k || sha256(k || message)), 'hex') = split_part(bound, ':', 2) THEN
      RETURN tenant;
    END IF;
  END LOOP;
  RAISE EXCEPTION 'asgi-tenancy: the tenant binding is not signed for this connection'
    USING ERRCODE = '42501';
END
$tenancy$"""

    def key_ddl(self) -> list[str]:
        """The private schema and key table: readable by their owner only."""
        return [
            f"CREATE SCHEMA IF NOT EXISTS {KEY_SCHEMA}",
            f"REVOKE ALL ON SCHEMA {KEY_SCHEMA} FROM PUBLIC",
            f"CREATE TABLE IF NOT EXISTS {KEY_TABLE} (key_id text PRIMARY KEY,"
            " secret bytea NOT NULL, installed_at timestamptz NOT NULL DEFAULT now())",
            f"REVOKE ALL ON {KEY_TABLE} FROM PUBLIC",
        ]

    async def install_keys(self, admin: AsyncConnection) -> None:
        """Make the database accept exactly this strategy's keys (rotation: pass new and old)."""
        ids = [_key_id(k) for k in self._keys]
        await admin.execute(
            text(f"DELETE FROM {KEY_TABLE} WHERE NOT (key_id = ANY(:ids))"), {"ids": ids}
        )
        for key_id, secret in zip(ids, self._keys, strict=True):
            await admin.execute(
                text(
                    f"INSERT INTO {KEY_TABLE} (key_id, secret) VALUES (:id, :secret)"
                    " ON CONFLICT (key_id) DO NOTHING"
                ),
                {"id": key_id, "secret": secret},
            )

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
        statements = (
            [*self.key_ddl(), self.function_ddl()] if self.signed else [self.function_ddl()]
        )
        for table in self.tenant_tables() if tables is None else tables:
            statements.extend(self.table_ddl(table))
        return statements

    async def install(self, admin: AsyncConnection, tables: Sequence[Table] | None = None) -> None:
        """Run ``ddl()`` on an admin (table owner) connection; signed: install the keys too."""
        for statement in self.ddl(tables):
            await admin.execute(text(statement))
        if self.signed:
            await self.install_keys(admin)

    # -- start-up validation ---------------------------------------------------------------

    async def validate(self, database: TenantDatabase) -> None:
        async with database.engine.connect() as conn:
            findings = await self.check(conn)
        if findings:
            raise IsolationConfigError(
                "row-level security would not hold: " + "; ".join(str(f) for f in findings),
                hint=findings[0].fix,
            )

    async def check(
        self, conn: AsyncConnection, tables: Sequence[Table] | None = None
    ) -> list[Finding]:
        """Every finding on the live database, read as the application's role.

        ``tables`` replaces the metadata's tables (the isolation audit passes the catalog's).
        """
        findings = await _check_role(conn)
        findings += await self._check_function(conn)
        if self.signed and not findings:
            findings += await self._check_signing(conn)
        if tables is None:
            tables = [] if self.metadata is None else self.metadata.sorted_tables
        findings += _check_unclassified(tables, self.tenant_column, self.shared_tables)
        checked = [t for t in tables if self.tenant_column in t.c]
        for table in checked:
            findings += await self._check_table(conn, table)
        findings += await self._check_unregistered(conn, {_qualified(t) for t in checked})
        findings += await self._check_policies(conn, checked)
        return findings

    async def _check_policies(
        self, conn: AsyncConnection, tables: Sequence[Table]
    ) -> list[Finding]:
        """A002-A004: every permissive policy that applies to this role confines to the tenant.

        Permissive policies are ORed, so one ``USING (true)`` beside ours opens the table; the
        judgement (from the parsed policy expressions) is shared with the isolation audit.
        """
        from .audit_rls import audit_policies

        role = str(await conn.scalar(text("SELECT current_user")))
        return await audit_policies(conn, role, self, tables)

    async def _check_unregistered(self, conn: AsyncConnection, known: set[str]) -> list[Finding]:
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
            {"column": self.tenant_column, "known": sorted(known)},
        )
        findings = []
        for row in rows:
            name = f"{row.schema}.{row.name}"
            if row.name in self.shared_tables or name in self.shared_tables:
                continue  # declared shared: the application's explicit choice
            quoted = f"{_quote(row.schema)}.{_quote(row.name)}"
            findings.append(
                Finding(
                    "R015",
                    name,
                    f"the app role can reach this table with a {self.tenant_column} column and"
                    " no forced row-level security; it is not in the application's metadata",
                    f"add it to the metadata and install its policy, or REVOKE ALL ON {quoted}"
                    f" FROM the application role",
                )
            )
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

    async def _check_signing(self, conn: AsyncConnection) -> list[Finding]:
        """The keys stay private, and the database accepts a binding signed by ours."""
        findings = []
        # Catalog joins, not to_regclass(): that needs the schema USAGE the app must not have.
        readable = await conn.scalar(
            text(
                "SELECT has_schema_privilege(n.oid, 'USAGE')"
                " AND has_table_privilege(c.oid, 'SELECT')"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = :schema AND c.relname = 'binding_keys'"
            ),
            {"schema": KEY_SCHEMA},
        )
        if readable:
            findings.append(
                Finding(
                    "R012",
                    KEY_TABLE,
                    "the application role can read the keys",
                    f"REVOKE ALL ON {KEY_TABLE} FROM <app role>",
                )
            )
        definer = await conn.scalar(
            text("SELECT prosecdef FROM pg_proc WHERE oid = to_regprocedure(:sig)"),
            {"sig": f"{self.function}()"},
        )
        if not definer:
            findings.append(
                Finding(
                    "R013",
                    self.function,
                    "the tenant function does not check signatures",
                    "run RowLevelSecurity(signed=True).install()",
                )
            )
            return findings
        pid = int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)
        raw = await conn.get_raw_connection()
        get_pid = getattr(raw.driver_connection, "get_server_pid", None)
        if get_pid is not None and int(get_pid()) != pid:
            # The process id the driver signs for is not the server's: a proxy such as
            # PgBouncer sits in between, and in transaction mode every signed query would fail.
            findings.append(
                Finding(
                    "R017",
                    "connection",
                    "the driver's server process id is not the backend's (a pooling proxy?)",
                    "connect the signed binding directly or through session pooling,"
                    " or use signed=False behind transaction pooling",
                )
            )
            return findings
        probe = Tenant("tenancy-validate-probe")
        try:
            async with conn.begin_nested():
                await conn.execute(text(self.backend_binding_sql(probe, pid)))
                accepted = await conn.scalar(text(f"SELECT {self.function}()"))
        except Exception:
            accepted = None
        if accepted != probe.id:
            findings.append(
                Finding(
                    "R014",
                    KEY_TABLE,
                    "the database does not accept this application's signing key",
                    "run install_keys() with it",
                )
            )
        return findings

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
            text(
                "SELECT rolname, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
            )
        )
    ).one()
    role = _quote(row.rolname)
    findings = []
    if row.rolsuper:
        findings.append(
            Finding(
                "R001",
                row.rolname,
                "the application connects as a superuser, which bypasses every policy",
                f"ALTER ROLE {role} NOSUPERUSER",
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
        if column not in table.c and table.name not in shared and table.fullname not in shared
    ]


KEY_SCHEMA = "tenancy_private"
KEY_TABLE = f"{KEY_SCHEMA}.binding_keys"


def binding_mac(key: bytes, tenant_id: str, backend_pid: int) -> str:
    """The MAC the tenant function recomputes: sha256(k || sha256(k || "tenant:pid"))."""
    inner = hashlib.sha256(key + f"{tenant_id}:{backend_pid}".encode()).digest()
    return hashlib.sha256(key + inner).hexdigest()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"asgi-tenancy key id:" + key).hexdigest()[:16]


def _signing_keys(signed: bool, keys: Sequence[str | bytes]) -> list[bytes]:
    if not signed:
        if keys:
            raise IsolationConfigError("signing_keys given but signed=False")
        return []
    if not keys:
        raise IsolationConfigError(
            "signed=True needs signing_keys", hint="e.g. [os.environ['TENANCY_BINDING_KEY']]"
        )
    return secret_keys(keys, what="signing")


def _qualified(table: Table) -> str:
    if table.schema:
        return f"{_quote(table.schema)}.{_quote(table.name)}"
    return _quote(table.name)
