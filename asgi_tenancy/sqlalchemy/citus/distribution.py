"""How tenant and shared tables are laid out on a Citus cluster, as DDL.

Tenant tables are distributed by the tenant column and colocated with the first of them, so
one tenant's rows of every table live in one shard group (joins and foreign keys stay on one
node, and a tenant moves as one). Shared tables become reference tables: a copy on every node,
so a join of a tenant table with one never leaves the tenant's node. Each statement is
idempotent (a DO block that looks in ``pg_dist_partition`` first), so ``install()`` reruns.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table

from ..postgres import qualified, quote_literal

__all__ = ["Distribution"]


class Distribution:
    """The Citus layout of an application's tables: distributed by ``tenant_column``."""

    def __init__(self, tenant_column: str) -> None:
        self.tenant_column = tenant_column

    def distribute(self, table: Table, colocate_with: Table | None) -> str:
        """``create_distributed_table`` by the tenant column, colocated, unless done."""
        name = quote_literal(qualified(table))
        colocate = "'default'" if colocate_with is None else quote_literal(qualified(colocate_with))
        call = (
            f"create_distributed_table({name}, {quote_literal(self.tenant_column)},"
            f" colocate_with => {colocate})"
        )
        return self._unless_distributed(name, call)

    def reference(self, table: Table) -> str:
        """``create_reference_table``: a copy of a shared table on every node, unless done."""
        name = quote_literal(qualified(table))
        return self._unless_distributed(name, f"create_reference_table({name})")

    def ddl(self, tenant_tables: Sequence[Table], shared_tables: Sequence[Table]) -> list[str]:
        """Reference tables first (tenant tables may hold foreign keys to them), then the
        tenant tables in dependency order, each colocated with the first."""
        statements = [self.reference(t) for t in shared_tables]
        first = tenant_tables[0] if tenant_tables else None
        for table in tenant_tables:
            statements.append(self.distribute(table, None if table is first else first))
        return statements

    def fix_distribute(self, names: Sequence[str], colocate_with: str | None) -> str:
        """The fix SQL for tenant tables left local or distributed by another column (an audit
        finding's ``fix``), all in one transaction.

        Citus distributes no table that a local table holds a foreign key to, nor one holding
        a key to a local table: the keys touching these tables are dropped, the tables
        (un)distributed in order, each colocated with ``colocate_with`` or the first of them,
        and the keys added back as they are when the fix runs (after the C004 fixes).
        """
        tables = ", ".join(quote_literal(n) for n in names)
        first = "'default'" if colocate_with is None else quote_literal(colocate_with)
        return f"""SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
DO $tenancy$
DECLARE
  tables text[] := ARRAY[{tables}];
  oids regclass[] := ARRAY(SELECT to_regclass(n) FROM unnest(tables) n);
  t text;
  colocate text := {first};
  fk record;
  keys text[] := '{{}}';
  k text;
BEGIN
  FOR fk IN SELECT c.conrelid::regclass::text AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
      FROM pg_constraint c WHERE c.contype = 'f'
      AND (c.conrelid = ANY (oids) OR c.confrelid = ANY (oids)) LOOP
    keys := keys || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
  END LOOP;
  -- by name: undistribute_table replaces the table (a new oid)
  FOREACH t IN ARRAY tables LOOP
    IF EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass(t)) THEN
      PERFORM undistribute_table(to_regclass(t));
    END IF;
    PERFORM create_distributed_table(to_regclass(t), {quote_literal(self.tenant_column)},
                                     colocate_with => colocate);
    IF colocate = 'default' THEN colocate := t; END IF;
  END LOOP;
  FOREACH k IN ARRAY keys LOOP EXECUTE k; END LOOP;
END
$tenancy$"""

    @staticmethod
    def _unless_distributed(name: str, call: str) -> str:
        return (
            "DO $tenancy$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_dist_partition"
            f" WHERE logicalrelid = to_regclass({name})) THEN PERFORM {call}; END IF; END"
            " $tenancy$"
        )
