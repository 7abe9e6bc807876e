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
    ("quote", "SELECT E'\\\\:tenant_id' FROM orders", CONFINED),
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
    # SQL guard II: PostgreSQL reads x.f and (x).f as f(x) when f is not a column
    ("attribute", "SELECT ('select * from orders').ts_stat", "unknown_column"),
    ("attribute", "SELECT o.pg_column_size FROM orders o", "unknown_column"),
    ("attribute", "SELECT (o).pg_column_size FROM orders o", "unknown_column"),
    ("attribute", "SELECT c.num_nulls FROM customers c", "unknown_column"),
    ("attribute", "SELECT ('1').pg_sleep", "unknown_column"),
    ("attribute", "SELECT (o.id).pg_advisory_lock FROM orders o", "unknown_column"),
    ("attribute", "SELECT (o.id).pg_terminate_backend FROM orders o", "unknown_column"),
    ("attribute", "SELECT ('app.tenant_id').current_setting", "unknown_column"),
    ("attribute", "SELECT ('orders').to_regclass", "unknown_column"),
    ("attribute", "SELECT (o.id).pg_stat_get_backend_activity FROM orders o", "unknown_column"),
    ("attribute", "SELECT o.status.upper FROM orders o", "unsupported_syntax"),
    ("attribute", "SELECT ((o).status).length FROM orders o", "unknown_column"),
    ("attribute", "SELECT t.row_to_json FROM (SELECT 1 AS a) t", "unknown_column"),
    (
        "attribute",
        "WITH w AS (SELECT id FROM orders) SELECT w.txid_current FROM w",
        "unknown_column",
    ),
    ("attribute", "SELECT x.query_to_xml FROM customers x", "unknown_column"),
    ("attribute", "SELECT g.pg_backend_pid FROM generate_series(1, 1) g", "unknown_column"),
    ("attribute", "SELECT u.lastval FROM unnest(ARRAY[1]) u", "unknown_column"),
    ("attribute", "SELECT (ROW(1, 2)).f1", "unknown_column"),
    ("attribute", "SELECT (SELECT o FROM orders o LIMIT 1).id", "unknown_column"),
    ("attribute", 'SELECT "o"."pg_sleep" FROM orders o', "unknown_column"),
    ("attribute", "SELECT j.setseed FROM (orders JOIN customers USING (id)) j", "unknown_column"),
    ("attribute", "SELECT o.ctid, o.xmin FROM orders o", "unknown_column"),
    ("attribute", "SELECT ctid FROM orders", "unknown_column"),
    # computed columns: a function over a table's row type, called as c.fn
    ("computed", "SELECT c.order_count FROM customers c", "unknown_column"),
    ("computed", "SELECT order_count(c) FROM customers c", "forbidden_function"),
    ("computed", "SELECT c.*, c.tenant_orders FROM customers c", "unknown_column"),
    ("computed", "SELECT (c).tenant_orders FROM customers c", "unknown_column"),
    ("computed", "SELECT public.order_count(c) FROM customers c", "schema_not_allowed"),
    # array and composite types: the catalog reached through a cast
    ("types", "SELECT '{orders}'::regclass[]", "forbidden_type"),
    ("types", "SELECT ARRAY['orders']::regclass[]", "forbidden_type"),
    ("types", "SELECT '{public}'::regnamespace[]", "forbidden_type"),
    ("types", "SELECT '{postgres}'::regrole[]", "forbidden_type"),
    ("types", "SELECT CAST('{now}' AS regproc[])", "forbidden_type"),
    ("types", "SELECT (null::pg_class).*", "forbidden_type"),
    ("types", "SELECT (null::orders).*", "forbidden_type"),
    ("types", "SELECT (null::secrets).*", "forbidden_type"),
    ("types", "SELECT null::pg_authid", "forbidden_type"),
    ("types", "SELECT row_to_json(null::pg_stat_activity)", "forbidden_type"),
    ("types", "SELECT 1::oid::regclass", "forbidden_type"),
    ("types", "SELECT '1'::regtype", "forbidden_type"),
    ("types", "SELECT 'english'::regconfig", "forbidden_type"),
    ("types", "SELECT * FROM jsonb_to_record('{}') AS r(a regclass)", "forbidden_type"),
    ("types", "SELECT * FROM jsonb_to_record('{}') AS r(a orders)", "forbidden_type"),
    ("types", "SELECT * FROM json_populate_record(null::customers, '{}')", "forbidden_function"),
    ("types", "SELECT xmlcomment('x')", "forbidden_function"),
    ("types", "SELECT '(1,2)'::int4range AS r, '{1,2}'::int4[] AS a FROM orders", CONFINED),
    # session state that outlives a rollback, and settings
    ("session", "SELECT pg_advisory_lock(1)", "forbidden_function"),
    ("session", "SELECT pg_try_advisory_lock(1)", "forbidden_function"),
    ("session", "SELECT pg_advisory_xact_lock(1)", "forbidden_function"),
    ("session", "SELECT setseed(0.5)", "forbidden_function"),
    ("session", "SELECT set_config('search_path', 'pg_temp', false)", "forbidden_function"),
    ("session", "SELECT pg_notify('c', 'x')", "forbidden_function"),
    ("session", "SELECT pg_sleep(10)", "forbidden_function"),
    ("session", "SELECT pg_sleep_for('1 minute')", "forbidden_function"),
    ("session", "SELECT lo_create(0)", "forbidden_function"),
    ("session", "SELECT dblink_connect('x')", "forbidden_function"),
    ("session", "SELECT txid_current()", "forbidden_function"),
    ("session", "SELECT pg_current_xact_id()", "forbidden_function"),
    # signals
    ("signals", "SELECT pg_terminate_backend(1)", "forbidden_function"),
    ("signals", "SELECT pg_cancel_backend(1)", "forbidden_function"),
    ("signals", "SELECT pg_reload_conf()", "forbidden_function"),
    ("signals", "SELECT pg_log_backend_memory_contexts(1)", "forbidden_function"),
    # sequences and statistics
    ("statistics", "SELECT nextval('orders_id_seq')", "forbidden_function"),
    ("statistics", "SELECT currval('orders_id_seq')", "forbidden_function"),
    ("statistics", "SELECT lastval()", "forbidden_function"),
    ("statistics", "SELECT pg_sequence_last_value('orders_id_seq')", "forbidden_function"),
    ("statistics", "SELECT pg_stat_get_live_tuples('orders'::regclass)", "forbidden_function"),
    ("statistics", "SELECT pg_stat_get_live_tuples(16384)", "forbidden_function"),
    ("statistics", "SELECT pg_stat_get_backend_activity(1)", "forbidden_function"),
    ("statistics", "SELECT * FROM pg_stat_get_activity(NULL)", "forbidden_function"),
    ("statistics", "SELECT pg_relation_size('orders')", "forbidden_function"),
    ("statistics", "SELECT * FROM pg_stat_user_tables", "unknown_table"),
    # the catalog through functions, and functions that run their text as a query
    ("catalog2", "SELECT to_regrole('postgres')", "forbidden_function"),
    ("catalog2", "SELECT has_schema_privilege('tenant_globex', 'usage')", "forbidden_function"),
    ("catalog2", "SELECT format_type(23, -1)", "forbidden_function"),
    ("catalog2", "SELECT pg_get_viewdef(16384)", "forbidden_function"),
    ("catalog2", "SELECT current_database()", "forbidden_function"),
    ("catalog2", "SELECT current_schemas(true)", "forbidden_function"),
    ("catalog2", "SELECT inet_server_addr()", "forbidden_function"),
    (
        "catalog2",
        "SELECT ts_stat('select to_tsvector(name) from public.customers')",
        "forbidden_function",
    ),
    ("catalog2", "SELECT * FROM ts_stat('select 1')", "forbidden_function"),
    ("catalog2", "SELECT ts_rewrite('a'::tsquery, 'select 1')", "forbidden_function"),
    ("catalog2", "SELECT get_current_ts_config()", "forbidden_function"),
    (
        "catalog2",
        "WITH c AS (SELECT * FROM customers) SELECT pg_column_size(c) FROM c",
        "forbidden_function",
    ),
    # operators
    ("operator", "SELECT 'a' ## 'b'", "forbidden_operator"),
    ("operator", "SELECT point '(1,1)' ~= point '(1,1)'", "forbidden_operator"),
    ("operator", "SELECT 1 OPERATOR(public.+) 1", "schema_not_allowed"),
    ("operator", "SELECT 1 === 1", "forbidden_operator"),
    # placeholders that must stay literals, and bytes no server accepts
    ("placeholder", "SELECT '%(tenant_id)s' AS x, id FROM orders", CONFINED),
    ("placeholder", "SELECT id FROM orders WHERE status = '%s' OR status <> '$1'", CONFINED),
    ("placeholder", "SELECT id FROM orders WHERE status = ':tenant_id' OR status = '?'", CONFINED),
    ("placeholder", 'SELECT id AS "%(tenant_id)s" FROM orders', CONFINED),
    ("placeholder", "SELECT id FROM orders -- %(tenant_id)s :tenant_id\n", CONFINED),
    ("placeholder", "SELECT 5 %(tenant_id)s FROM orders", "unsupported_syntax"),
    ("bytes", "SELECT 'a\x00b' FROM orders", "invalid_text"),
    ("bytes", "SELECT '\ud800' FROM orders", "invalid_text"),
    # errors raised on another tenant's rows would tell about them: the filter is a barrier
    (
        "side channel",
        "SELECT count(*) FROM customers WHERE CASE WHEN name LIKE '%GL%' "
        "THEN 1 / (id - id) ELSE 0 END = 0",
        CONFINED,
    ),
    (
        "side channel",
        "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id "
        "AND CASE WHEN c.name LIKE '%IN%' THEN 1 / (c.id - c.id) = 1 ELSE true END",
        CONFINED,
    ),
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
    assert len(ATTACKS) >= 220
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
    # a side-channel probe fails on the one tenant whose own rows trip it, on both databases
    side = sum(1 for category, _, reason in ATTACKS if category == "side channel")
    assert oracle.compared + oracle.errors == len(confined) * len(TENANTS)
    assert oracle.errors <= side
