"""Attacks: each is refused with its expected reason, or confined by the oracle."""

from __future__ import annotations

import pytest

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlguard import REASONS, UnsafeQuery
from tests.sqlguard.corpus import TENANTS
from tests.sqlguard.oracle import Oracle, make_guard

CONFINED = None  # accepted, and the oracle proves it reads only the tenant's rows

# (category, sql, expected reason or CONFINED)
ATTACKS: list[tuple[str, str, str | None]] = [
    # tautologies and filters naming other tenants
    ("tautology", "SELECT * FROM orders WHERE status = 'paid' OR 1=1", CONFINED),
    ("tautology", "SELECT * FROM orders WHERE tenant_id = 'globex'", CONFINED),
    ("tautology", "SELECT * FROM orders WHERE tenant_id <> 'acme' OR true", CONFINED),
    ("tautology", "SELECT * FROM customers WHERE true OR tenant_id IS NOT NULL", CONFINED),
    (
        "tautology",
        "SELECT count(*) FROM orders o WHERE o.tenant_id IN ('acme', 'globex', 'initech')",
        CONFINED,
    ),
    # UNION and subqueries into another tenant
    (
        "union",
        "SELECT id, tenant_id FROM orders UNION ALL "
        "SELECT id, tenant_id FROM orders WHERE tenant_id = 'globex'",
        CONFINED,
    ),
    (
        "union",
        "SELECT name FROM customers UNION SELECT name FROM public.customers WHERE 1=1",
        CONFINED,
    ),
    ("union", "SELECT id FROM orders WHERE false UNION ALL SELECT id FROM public.orders", CONFINED),
    ("union", "SELECT * FROM (SELECT * FROM orders) o WHERE o.tenant_id != 'acme'", CONFINED),
    ("union", "SELECT (SELECT count(*) FROM orders WHERE tenant_id = 'initech')", CONFINED),
    (
        "union",
        "SELECT * FROM customers c WHERE EXISTS (SELECT 1 FROM orders WHERE tenant_id = 'globex')",
        CONFINED,
    ),
    (
        "union",
        "SELECT * FROM customers c, LATERAL "
        "(SELECT * FROM orders o WHERE o.tenant_id <> c.tenant_id) l",
        CONFINED,
    ),
    ("union", "SELECT * FROM customers INTERSECT SELECT * FROM public.customers", CONFINED),
    # comments and quotes
    ("comment", "SELECT * FROM orders -- WHERE tenant_id = 'x'\n", CONFINED),
    ("comment", "SELECT * FROM orders /* ; DELETE FROM orders */", CONFINED),
    ("comment", "SELECT * FROM orders; -- DROP TABLE orders", CONFINED),
    ("comment", "SELECT * FROM/**/orders/**/WHERE/**/1=1", CONFINED),
    ("comment", "SELECT * FROM public/* x */./* y */orders", CONFINED),
    ("quote", "SELECT 'x'';DELETE FROM orders;--' FROM orders", CONFINED),
    ("quote", "SELECT * FROM orders WHERE status = 'paid'' OR ''1''=''1'", CONFINED),
    ("quote", "SELECT * FROM orders WHERE status = 'a' /* ' */ OR 1=1 -- '", CONFINED),
    ("quote", "SELECT * FROM orders WHERE status = E'paid\\' OR 1=1 --'", CONFINED),
    ("quote", "SELECT ':tenant_id' AS x, * FROM orders", CONFINED),
    ("quote", "SELECT * FROM orders WHERE status = ':tenant_id' OR '{\"a\":b}' <> ''", CONFINED),
    ("quote", "SELECT E'\\\\:tenant_id' FROM orders", "unsupported_syntax"),
    # stacked statements
    ("stacked", "SELECT 1; DELETE FROM orders", "multiple_statements"),
    ("stacked", "SELECT * FROM orders; SELECT * FROM public.orders", "multiple_statements"),
    ("stacked", "SELECT 1;;SELECT 2", "multiple_statements"),
    ("stacked", "SELECT 1; SET ROLE postgres", "multiple_statements"),
    ("stacked", "SELECT 1; COMMIT; SELECT * FROM orders", "multiple_statements"),
    # CTE shadowing
    ("cte", "WITH orders AS (SELECT * FROM orders) SELECT * FROM orders", CONFINED),
    ("cte", "WITH x AS (SELECT 1) SELECT * FROM public.orders", CONFINED),
    ("cte", "WITH customers AS (SELECT * FROM orders) SELECT * FROM customers", CONFINED),
    ("cte", "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", "unknown_table"),
    (
        "cte",
        "WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1 AS x) SELECT * FROM a",
        CONFINED,
    ),
    (
        "cte",
        "SELECT * FROM (WITH orders AS (SELECT 1 AS id) SELECT * FROM orders) s, orders",
        CONFINED,
    ),
    (
        "cte",
        "WITH orders AS (SELECT id FROM orders WHERE tenant_id = 'globex') SELECT * FROM orders",
        CONFINED,
    ),
    (
        "cte",
        "WITH RECURSIVE orders AS (SELECT * FROM public.orders) SELECT count(*) FROM orders",
        CONFINED,
    ),
    ("cte", "WITH pg_class AS (SELECT 1) SELECT * FROM pg_catalog.pg_class", "schema_not_allowed"),
    # settings, roles, sessions
    ("settings", "SELECT set_config('app.tenant', 'globex', false)", "forbidden_function"),
    ("settings", "SELECT current_setting('app.tenant')", "forbidden_function"),
    ("settings", "RESET ALL", "not_a_select"),
    ("settings", "RESET app.tenant", "not_a_select"),
    ("settings", "SET ROLE postgres", "not_a_select"),
    ("settings", "SET app.tenant = 'globex'", "not_a_select"),
    ("settings", "SET SESSION AUTHORIZATION postgres", "not_a_select"),
    (
        "settings",
        "SELECT * FROM orders WHERE set_config('statement_timeout', '0', false) IS NOT NULL",
        "forbidden_function",
    ),
    ("settings", "SELECT pg_catalog.set_config('a', 'b', true)", "forbidden_function"),
    ("settings", "SELECT current_user", "forbidden_function"),
    ("settings", "SELECT session_user, current_schema", "forbidden_function"),
    # catalog and information_schema
    ("catalog", "SELECT * FROM pg_class", "unknown_table"),
    ("catalog", "SELECT * FROM pg_catalog.pg_tables", "schema_not_allowed"),
    ("catalog", "SELECT * FROM information_schema.tables", "schema_not_allowed"),
    ("catalog", "SELECT * FROM pg_roles", "unknown_table"),
    ("catalog", "SELECT * FROM pg_stat_activity", "unknown_table"),
    ("catalog", "SELECT 'orders'::regclass::oid", "forbidden_type"),
    ("catalog", "SELECT CAST('public.orders' AS pg_catalog.regclass)", "forbidden_type"),
    ("catalog", "SELECT 'now'::regproc, 'int4'::regtype[]", "forbidden_type"),
    ("catalog", "SELECT pg_read_file('/etc/passwd')", "forbidden_function"),
    ("catalog", "SELECT version()", "forbidden_function"),
    ("catalog", "SELECT to_regclass('orders')", "forbidden_function"),
    ("catalog", "SELECT has_table_privilege('orders', 'select')", "forbidden_function"),
    # other schemas
    ("schema", "SELECT * FROM other.orders", "schema_not_allowed"),
    ("schema", "SELECT * FROM tenant_globex.orders", "schema_not_allowed"),
    ("schema", "SELECT * FROM mydb.public.orders", "schema_not_allowed"),
    ("schema", 'SELECT * FROM "public"."orders"', CONFINED),
    ("schema", "SELECT * FROM PUBLIC.ORDERS", CONFINED),
    ("schema", "SELECT evil.f()", "schema_not_allowed"),
    ("schema", "SELECT public.lower('a')", "schema_not_allowed"),
    ("schema", "SELECT 1 OPERATOR(evil.+) 1", "schema_not_allowed"),
    ("schema", "SELECT 1::evil.money", "schema_not_allowed"),
    ("schema", "SELECT 'a' COLLATE evil.\"C\"", "schema_not_allowed"),
    # quoted and Unicode-escaped identifiers
    ("identifier", 'SELECT * FROM "Orders"', "unknown_table"),
    ("identifier", 'SELECT * FROM "orders "', "unknown_table"),
    ("identifier", 'SELECT * FROM U&"\\006Frders"', CONFINED),
    ("identifier", "SELECT * FROM U&\"!006Frders\" UESCAPE '!'", CONFINED),
    ("identifier", "SELECT o.id FROM U&\"\\006Frders\" UESCAPE '\\' AS o", CONFINED),
    ("identifier", 'SELECT * FROM U&"pg_\\0063lass"', "unknown_table"),
    ("identifier", 'SELECT * FROM "pg_catalog"."pg_class"', "schema_not_allowed"),
    ("identifier", 'SELECT * FROM U&"\\0070\\0067_catalog".pg_class', "schema_not_allowed"),
    ("identifier", 'SELECT * FROM "public".U&"\\006Frders" *', CONFINED),
    ("identifier", 'SELECT "id" FROM "customers" "orders"', CONFINED),
    # dollar quoting and parameters
    ("dollar", "SELECT $$ ; DELETE FROM orders; $$ FROM orders", CONFINED),
    ("dollar", "SELECT $x$'; DROP TABLE orders; --$x$, id FROM orders", CONFINED),
    ("dollar", "DO $$ BEGIN DELETE FROM orders; END $$", "not_a_select"),
    ("dollar", "SELECT $1 FROM orders", "parameter_not_allowed"),
    ("dollar", "SELECT * FROM orders WHERE id = $1", "parameter_not_allowed"),
    # table functions
    ("function", "SELECT * FROM dblink('host=x', 'SELECT 1') AS t(a int)", "forbidden_function"),
    ("function", "SELECT * FROM pg_ls_dir('.')", "forbidden_function"),
    ("function", "SELECT * FROM generate_series(1, 3), orders", CONFINED),
    ("function", "SELECT * FROM json_populate_record(null::orders, '{}')", "forbidden_function"),
    ("function", "SELECT lo_import('/etc/passwd')", "forbidden_function"),
    (
        "function",
        "SELECT query_to_xml('select * from orders', true, true, '')",
        "forbidden_function",
    ),
    (
        "function",
        "SELECT * FROM XMLTABLE('/a' PASSING '<a/>' COLUMNS x int)",
        "forbidden_function",
    ),
    (
        "function",
        "SELECT * FROM ROWS FROM (generate_series(1, 2), pg_backend_pid()) AS t(a, b)",
        "forbidden_function",
    ),
    ("function", "SELECT * FROM current_user", "forbidden_function"),
    ("function", "SELECT * FROM orders_by_tenant('globex')", "forbidden_function"),
    # writes hidden in CTEs
    ("write", "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", "data_modifying_cte"),
    (
        "write",
        "WITH u AS (UPDATE orders SET total = 0 RETURNING id) SELECT count(*) FROM u",
        "data_modifying_cte",
    ),
    (
        "write",
        "WITH i AS (INSERT INTO orders SELECT * FROM orders RETURNING id) SELECT 1",
        "data_modifying_cte",
    ),
    (
        "write",
        "SELECT * FROM (WITH d AS (DELETE FROM customers RETURNING *) SELECT * FROM d) s",
        "data_modifying_cte",
    ),
    ("write", "DELETE FROM orders", "not_a_select"),
    ("write", "UPDATE orders SET total = 0", "not_a_select"),
    ("write", "INSERT INTO orders SELECT * FROM orders", "not_a_select"),
    ("write", "SELECT * INTO stolen FROM orders", "not_a_select"),
    ("write", "CREATE TABLE x AS SELECT * FROM orders", "not_a_select"),
    ("write", "COPY orders TO STDOUT", "not_a_select"),
    ("write", "EXPLAIN ANALYZE SELECT * FROM orders", "not_a_select"),
    ("write", "TRUNCATE orders", "not_a_select"),
    # locking clauses
    ("locking", "SELECT * FROM orders FOR UPDATE", "locking_clause"),
    ("locking", "SELECT * FROM orders FOR SHARE SKIP LOCKED", "locking_clause"),
    ("locking", "SELECT * FROM orders o FOR NO KEY UPDATE OF o", "locking_clause"),
    ("locking", "SELECT * FROM (SELECT * FROM orders FOR UPDATE) s", "locking_clause"),
    ("locking", "SELECT * FROM customers FOR KEY SHARE NOWAIT", "locking_clause"),
    # size and shape
    ("limits", "SELECT " + "1+" * 5_000 + "1", "too_complex"),
    ("limits", "SELECT " + "(" * 200 + "1" + ")" * 200, "too_complex"),
    ("limits", "SELECT 1 " + " " * 30_000, "too_complex"),
    ("limits", "SELECT " + "NOT " * 3_000 + "true", "too_complex"),
    ("shape", "SELECT * FROM ONLY orders", "unsupported_syntax"),
    ("shape", "SELECT * FROM orders TABLESAMPLE SYSTEM (50)", "unsupported_syntax"),
    ("shape", "SELECT public.orders.id FROM public.orders", "unsupported_syntax"),
    ("shape", "", "empty_query"),
    ("shape", "  -- only a comment", "empty_query"),
    ("shape", "SELEC 1", "parse_error"),
    ("shape", "SELECT * FROM orders WHERE", "parse_error"),
]


def _refusal(sql: str) -> str | None:
    guard = make_guard()
    with tenant_scope(Tenant("acme")):
        try:
            guard.rewrite(sql)
        except UnsafeQuery as exc:
            refused = exc
        else:
            return None
    assert refused.message
    return refused.reason


def test_there_are_enough_attacks_in_every_category() -> None:
    assert len(ATTACKS) >= 60
    assert len({sql for _, sql, _ in ATTACKS}) == len(ATTACKS)
    for _, _, reason in ATTACKS:
        assert reason is None or reason in REASONS


@pytest.mark.parametrize(
    ("sql", "reason"),
    [(sql, reason) for _, sql, reason in ATTACKS if reason is not None],
)
def test_attack_is_refused_with_its_reason(sql: str, reason: str) -> None:
    assert _refusal(sql) == reason


def test_confined_attacks_read_only_the_tenants_rows(oracle: Oracle) -> None:
    confined = [sql for _, sql, reason in ATTACKS if reason is None]
    for sql in confined:
        assert _refusal(sql) is None, sql
        for tenant in TENANTS:
            oracle.check(sql, tenant)
    assert oracle.compared == len(confined) * len(TENANTS)
