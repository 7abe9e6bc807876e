"""The RowLevelSecurity strategy: its configuration, binding and DDL.

The policy reads the tenant through ``(SELECT <schema>.tenancy_current_tenant())``: a scalar
sub-SELECT is evaluated once per statement (an InitPlan), not once per row, and the function
raises when the setting is missing or empty, so a transaction nobody bound fails loudly at the
database instead of quietly returning nothing. RLS is ENABLEd and FORCEd so the table owner is
held to it too, and the policy has an explicit WITH CHECK so writes are confined like reads.

``citus=True`` (a Citus cluster, ``docs/scale-out.md``): the binding is a ``SET LOCAL`` the
coordinator carries to its workers, the policy calls the function directly (Citus refuses
sub-SELECTs in policies on distributed tables; the function still raises when unbound), and
``ddl()`` distributes the tenant tables by the tenant column and makes shared ones reference
tables. It is a flag, not detection: the binding is fixed per tenant before any connection
exists, and the default path asks the server nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sqlalchemy import MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...checks import Finding
from ...errors import IsolationConfigError
from ...tenant import Tenant
from ..citus.binding import citus_binding
from ..citus.checks import check_citus
from ..citus.distribution import Distribution
from ..criteria import TenantCriteria
from ..placement import AuditContext, Placement
from ..postgres import qualified, quote_ident, quote_literal
from ..strategy import Binding, IsolationStrategy
from . import checks, signing
from .audit import audit_rls
from .policies import POLICY_NAME

__all__ = ["RowLevelSecurity"]

_SETTING = re.compile(r"[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*\Z")
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_MAX_BINDINGS = 10_000  # tenants whose binding is kept: ~100 bytes each, ~1 MB in all


class RowLevelSecurity(IsolationStrategy):
    """Isolation by PostgreSQL row-level security on tables shared by all tenants.

    ``metadata`` lists the application's tables: those with ``tenant_column`` are tenant
    tables (policy, index, checks); the others must be named in ``shared_tables``.
    ``citus=True`` serves tables distributed on a Citus cluster (not with ``signed``).
    """

    name = "row"
    title = "row-level security"

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
        pooling: signing.Pooling = "none",
        token_window: float = 10.0,
        citus: bool = False,
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
        self.function = f"{quote_ident(function_schema)}.tenancy_current_tenant"
        self.criteria = TenantCriteria(tenant_column) if orm_criteria else None
        self.signed = signed
        self.signer: signing.Signer | None = None
        if signed:
            self.signer = signing.Signer(
                setting,
                signing_keys,
                function_schema=function_schema,
                pooling=pooling,
                window=token_window,
            )
            self.connect_sql = self.signer.connect_sql
        elif signing_keys or pooling != "none":
            raise IsolationConfigError("signing_keys and pooling need signed=True")
        self.citus = citus
        self.distribution = Distribution(tenant_column) if citus else None
        if citus and (signed or not orm_criteria):
            raise IsolationConfigError(
                "citus=True needs orm_criteria=True and signed=False",
                hint="workers cannot verify a signed binding (docs/scale-out.md); the ORM"
                " predicate routes each query to one shard",
            )
        self._bindings: dict[str, Binding] = {}

    # -- binding ---------------------------------------------------------------------------

    def binding(self, tenant: Tenant) -> Binding:
        if self.signer is not None:
            return self.signer.binding(tenant.id)
        binding = self._bindings.get(tenant.id)
        if binding is None:
            if self.citus:
                binding = citus_binding(self.setting, tenant.id)
            else:
                literal = quote_literal(tenant.id)
                # A utility statement: no plan, no row; 12 µs less server time than set_config.
                binding = Binding(f"SET LOCAL {self.setting} = {literal}")
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.clear()
            self._bindings[tenant.id] = binding
        return binding

    # -- DDL -------------------------------------------------------------------------------

    def tenant_tables(self) -> list[Table]:
        if self.metadata is None:
            return []
        return [t for t in self.metadata.sorted_tables if self.tenant_column in t.c]

    def function_ddl(self) -> str:
        """The unsigned tenant function (the signed binding's functions come with ``ddl()``)."""
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

    def policy_predicate(self) -> str:
        """The one predicate of every policy: the tenant column against the bound tenant
        (on Citus a direct call: sub-SELECTs are refused in policies on distributed tables)."""
        if self.citus:
            return f"{quote_ident(self.tenant_column)} = {self.function}()"
        return f"{quote_ident(self.tenant_column)} = (SELECT {self.function}())"

    def table_ddl(self, table: Table) -> list[str]:
        """ENABLE + FORCE, the policy with USING and WITH CHECK, the tenant index."""
        name = qualified(table)
        predicate = self.policy_predicate()
        index = quote_ident(f"ix_{table.name}_{self.tenant_column}"[:63])
        return [
            f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
            f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS {POLICY_NAME} ON {name}",
            f"CREATE POLICY {POLICY_NAME} ON {name} AS PERMISSIVE FOR ALL "
            f"USING ({predicate}) WITH CHECK ({predicate})",
            f"CREATE INDEX IF NOT EXISTS {index} ON {name} ({quote_ident(self.tenant_column)})",
        ]

    def ddl(self, tables: Sequence[Table] | None = None) -> list[str]:
        """Every statement the set-up needs, in order; ``op.execute`` each in an Alembic step."""
        statements = self.signer.ddl() if self.signer is not None else [self.function_ddl()]
        tenant_tables = self.tenant_tables() if tables is None else list(tables)
        if self.distribution is not None:
            statements += self.distribution.ddl(tenant_tables, self.shared_metadata_tables())
        for table in tenant_tables:
            statements.extend(self.table_ddl(table))
        return statements

    def shared_metadata_tables(self) -> list[Table]:
        """The metadata's shared tables (reference tables on Citus)."""
        if self.metadata is None:
            return []
        return [t for t in self.metadata.sorted_tables if self.tenant_column not in t.c]

    async def install(self, admin: AsyncConnection, tables: Sequence[Table] | None = None) -> None:
        """Run ``ddl()`` on an admin (table owner) connection; signed: install the keys too."""
        for statement in self.ddl(tables):
            await admin.execute(text(statement))
        if self.signer is not None:
            await self.signer.install_keys(admin)

    async def install_keys(self, admin: AsyncConnection) -> None:
        """Make the database accept exactly this strategy's keys (rotation: pass new and old)."""
        if self.signer is None:
            raise IsolationConfigError("install_keys() needs signed=True")
        await self.signer.install_keys(admin)

    # -- checks ----------------------------------------------------------------------------

    async def check(
        self, conn: AsyncConnection, tables: Sequence[Table] | None = None
    ) -> list[Finding]:
        """Every finding on the live database, read as the application's role.

        ``tables`` replaces the metadata's tables (the isolation audit passes the catalog's).
        """
        findings = await checks.check(self, conn, tables)
        checked = self.tenant_tables() if tables is None else tables
        tenant_tables = [t for t in checked if self.tenant_column in t.c]
        return findings + await check_citus(self, conn, tenant_tables)

    async def audit(self, audit: AuditContext) -> list[Finding]:
        return await audit_rls(self, audit)

    @property
    def placement(self) -> Placement:
        """On Citus a tenant's rows are a shard group that can move between nodes."""
        if self.citus:
            from ..citus.move import CitusRowPlacement  # operations only: not on the request path

            return CitusRowPlacement(self)
        return Placement()
