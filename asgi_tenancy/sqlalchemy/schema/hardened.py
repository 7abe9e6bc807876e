"""SchemaPerTenant's hardened mode: a signed tenant check in every tenant table's policy.

A schema's ``search_path`` holds against mistakes only: injected SQL can name another tenant's
schema (``tenant_globex.orders``) or move the path. In the hardened mode every table of a tenant
schema also has row-level security, ENABLEd and FORCEd, with one policy that admits a row only
when the transaction's *signed* binding names the schema's own tenant:
``USING ((SELECT <schema>.tenancy_current_tenant()) = 'acme')`` (and the same WITH CHECK). The
binding is the signed one of ``RowLevelSecurity(signed=True)``: raw SQL can neither forge nor
replay it, so another tenant's schema answers no row and refuses every write. The predicate is
a constant per statement (an InitPlan): no per-row cost.
"""

from __future__ import annotations

from ..postgres import quote_ident, quote_literal

__all__ = ["POLICY", "policies_sql", "unguarded_sql"]

POLICY = "tenancy_isolation"


def policies_sql(schema: str, tenant_id: str, function: str) -> str:
    """One statement (the owner's) that puts the policy on every table of ``schema``."""
    predicate = f"(SELECT {function}()) = {quote_literal(tenant_id)}"
    return f"""DO $tenancy$
DECLARE t regclass;
BEGIN
  FOR t IN SELECT c.oid::regclass FROM pg_class c
           WHERE c.relnamespace = {quote_literal(quote_ident(schema))}::regnamespace
           AND c.relkind IN ('r', 'p') LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('DROP POLICY IF EXISTS {POLICY} ON %s', t);
    EXECUTE format('CREATE POLICY {POLICY} ON %s AS PERMISSIVE FOR ALL USING (%s)'
                   ' WITH CHECK (%s)', t, {quote_literal(predicate)}, {quote_literal(predicate)});
  END LOOP;
END
$tenancy$"""


def unguarded_sql() -> str:
    """Tables of a schema (``:schema``) that the hardened policy does not guard for ``:tenant``:
    no forced RLS, or a permissive policy other than the library's, or the library's naming
    another tenant."""
    return (
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND ("
        " NOT (c.relrowsecurity AND c.relforcerowsecurity)"
        " OR EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND p.polpermissive"
        f"  AND p.polname <> '{POLICY}')"
        " OR NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid"
        f"  AND p.polname = '{POLICY}' AND p.polcmd = '*'"
        "  AND strpos(pg_get_expr(p.polqual, p.polrelid), :literal) > 0"
        "  AND strpos(pg_get_expr(p.polwithcheck, p.polrelid), :literal) > 0))"
        " ORDER BY 1"
    )
