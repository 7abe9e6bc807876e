"""What the server resolves, checked against what the guard allowed, on real PostgreSQL.

- every accepted query: every function, operator, type and relation the server resolved (its
  own deparse of the query, and pg_depend for anything that is not a built-in) and every call
  in its plan (``EXPLAIN (VERBOSE, FORMAT JSON)``) is on the allow-lists;
- the output columns the guard computes are the columns the server returns;
- every function of ``pg_catalog`` that is not allowed, in every notation (``f(x)``, ``x.f``,
  ``(x).f``, FROM, LATERAL, quoted), and every type of ``pg_type`` that is not allowed, in
  every notation (casts, arrays, typed literals, column definitions, ``(null::t).*``), is
  refused; the server accepts many of the attribute-notation forms, so the attacks are real.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from sqlalchemy.exc import DBAPIError

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlguard import REASONS, UnsafeQuery
from asgi_tenancy.sqlguard._allowlist import FUNCTIONS, OPERATORS, TYPES
from asgi_tenancy.sqlguard._analyze import analyze
from asgi_tenancy.sqlguard._parser import parse
from tests.sqlguard.corpus import QUERIES, TENANT_TABLES
from tests.sqlguard.oracle import COLUMNS, Oracle, Resolution, compiled, make_guard, plan_calls
from tests.sqlguard.test_attacks import ATTACKS
from tests.sqlguard.test_generated import queries

GUARD = make_guard()
DECLARED = set(COLUMNS)
# Names the plan writes as calls that are SQL syntax, not functions.
SYNTAX = frozenset(
    {"COALESCE", "EXTRACT", "GREATEST", "LEAST", "NULLIF", "POSITION", "ROW", "SUBSTRING", "TRIM"}
    | {"ANY", "ALL", "ARRAY", "EXISTS", "OVERLAY", "NORMALIZE", "SubPlan", "CASE", "IS", "NOT"}
)
# Types the server coerces a literal to for an allowed function's parameter, never written in
# a guarded query: the text search configuration of to_tsvector('english', ...) is looked up
# by name (pg_ts_config: public configuration names, no tenant data).
COERCED = frozenset({"regconfig"})
ACCEPTED = [*QUERIES, *(sql for _, sql, reason in ATTACKS if reason is None)]


def _rewrite(sql: str) -> str:
    with tenant_scope(Tenant("acme")):
        return GUARD.rewrite(sql).sql


def _bare(name: str) -> str:
    return name.removeprefix("pg_catalog.").removeprefix("OPERATOR(pg_catalog.").rstrip(")")


def assert_resolved_objects_allowed(resolution: Resolution, sql: str) -> None:
    rewritten = _rewrite(sql)
    try:
        objects = resolution.objects(rewritten)
        calls = plan_calls(resolution.plan(rewritten))
    except DBAPIError:
        return  # invalid on the server as well: nothing ran
    for kind, schema, name in objects:
        if schema:  # pg_depend: not a built-in; only the declared tables may show up
            assert (kind, schema) == ("relation", "public"), (sql, name)
            assert name in DECLARED, (sql, name)
        elif kind == "function":
            assert "." not in _bare(name), (sql, name)
            assert _bare(name) in FUNCTIONS, (sql, name)
        elif kind == "operator":
            assert _bare(name) in OPERATORS, (sql, name)
        elif kind == "type":
            assert _bare(name) in TYPES or _bare(name) in COERCED, (sql, name)
        elif kind == "relation" and not name.startswith("."):
            assert name.startswith("public."), (sql, name)
            assert name[7:] in DECLARED, (sql, name)
    for call in calls:
        assert call in SYNTAX or call in FUNCTIONS, (sql, call)


def test_every_object_an_accepted_query_resolves_to_is_allowed(oracle: Oracle) -> None:
    resolution = Resolution(oracle)
    for sql in ACCEPTED:
        assert_resolved_objects_allowed(resolution, sql)


@settings(max_examples=150, database=None)
@given(sql=queries())
def test_every_object_a_generated_query_resolves_to_is_allowed(oracle: Oracle, sql: str) -> None:
    assert_resolved_objects_allowed(Resolution(oracle), sql)


def _fuzzed_accepted() -> list[str]:
    from tests.sqlguard.test_fuzz import _inputs

    rnd = random.Random(7)
    accepted: list[str] = []
    with tenant_scope(Tenant("acme")):
        for sql in rnd.sample(_inputs(), 2_500):
            try:
                GUARD.rewrite(sql)
            except UnsafeQuery:
                continue
            accepted.append(sql)
    return accepted[:300]


def test_every_object_a_fuzzed_accepted_query_resolves_to_is_allowed(oracle: Oracle) -> None:
    resolution = Resolution(oracle)
    accepted = _fuzzed_accepted()
    assert len(accepted) >= 100
    for sql in accepted:
        assert_resolved_objects_allowed(resolution, sql)


def test_the_output_columns_the_guard_computes_are_the_servers(oracle: Oracle) -> None:
    resolution = Resolution(oracle)
    compared = 0
    for sql in ACCEPTED:
        b = sql.encode()
        analysis, _, _ = analyze(
            parse(sql),
            b,
            rules=GUARD._rules,
            schema="public",
            functions=FUNCTIONS,
            max_depth=100,
        )
        if not analysis.output.complete:
            continue
        literal = compiled(_rewrite(sql)).replace("$1", "'acme'")
        try:
            server = resolution.columns(literal)
        except DBAPIError:
            continue
        assert list(analysis.output.names) == [c[:63] for c in server], sql
        compared += 1
    assert compared >= 0.9 * len(ACCEPTED)


# -- every function and type the server has, in every notation -------------------------------

FUNCTION_FORMS = (
    'SELECT "{f}"(o.id) FROM orders o',
    'SELECT pg_catalog."{f}"(o.status) FROM orders o',
    'SELECT o."{f}" FROM orders o',
    'SELECT (o)."{f}" FROM orders o',
    "SELECT ('x').\"{f}\"",
    'SELECT (o.status)."{f}" FROM orders o',
    "SELECT * FROM \"{f}\"('x')",
    'SELECT * FROM orders o, LATERAL "{f}"(o.id) AS t',
    'SELECT * FROM ROWS FROM (generate_series(1, 2), "{f}"(1)) AS t',
    'SELECT c."{f}" FROM (SELECT * FROM customers) c',
    'WITH w AS (SELECT * FROM orders) SELECT w."{f}" FROM w',
    'SELECT x."{f}" FROM customers AS x(a, b)',
    'SELECT "{f}"(VARIADIC ARRAY[1])',
    'SELECT count(*) FILTER (WHERE "{f}"(o.id) IS NULL) FROM orders o',
)
TYPE_FORMS = (
    'SELECT null::"{t}"',
    'SELECT CAST(NULL AS "{t}")',
    'SELECT null::"{t}"[]',
    "SELECT \"{t}\" 'x'",
    'SELECT (null::"{t}").*',
    "SELECT * FROM jsonb_to_record('{{}}') AS r(a \"{t}\")",
    "SELECT 'x'::pg_catalog.\"{t}\"",
    'SELECT ARRAY[]::"{t}"[]',
)


def _catalog(oracle: Oracle, sql: str) -> list[str]:
    return [row[0] for row in oracle.fetch_shared(sql)]


def _refused(sql: str) -> str:
    with tenant_scope(Tenant("acme")):
        try:
            GUARD.rewrite(sql)
        except UnsafeQuery as exc:
            return exc.reason
    return ""


def test_every_function_not_allowed_is_refused_in_every_notation(oracle: Oracle) -> None:
    names = _catalog(
        oracle,
        "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace",
    )
    columns = {c for cols in COLUMNS.values() for c in cols}
    forbidden = sorted(n for n in names if n not in FUNCTIONS and n not in columns)
    assert len(forbidden) > 2_000
    cases = 0
    for name in forbidden:
        for form in FUNCTION_FORMS:
            sql = form.format(f=name.replace('"', '""'))
            reason = _refused(sql)
            assert reason in REASONS, sql
            cases += 1
    assert cases == len(forbidden) * len(FUNCTION_FORMS)


def test_the_server_reads_attribute_notation_as_calls_so_the_attacks_are_real(
    oracle: Oracle,
) -> None:
    resolution = Resolution(oracle)
    candidates = ["pg_column_size", "num_nulls", "row_to_json", "to_json", "pg_typeof"]
    accepted = [n for n in candidates if resolution.explain_raw(f'SELECT o."{n}" FROM orders o')]
    assert len(accepted) >= 4  # PostgreSQL calls these; the guard refuses every one of them
    for name in accepted:
        assert _refused(f'SELECT o."{name}" FROM orders o') == "unknown_column"
    assert not resolution.explain_raw("SELECT 1 FROM orders o WHERE o.no_such_function")


def test_every_type_not_allowed_is_refused_in_every_notation(oracle: Oracle) -> None:
    names = _catalog(
        oracle, "SELECT typname FROM pg_type WHERE typnamespace = 'pg_catalog'::regnamespace"
    )
    rows = ["orders", "customers", "countries", "order_items", "pg_class", "pg_authid"]
    forbidden = sorted({n for n in names if n not in TYPES} | set(rows))
    assert len(forbidden) > 300
    assert {"regclass", "regnamespace", "regrole", "regproc", "pg_class"} <= set(forbidden)
    for name in forbidden:
        for form in TYPE_FORMS:
            sql = form.format(t=name)
            assert _refused(sql) in REASONS - {""}, sql


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
def test_tenant_tables_row_types_are_never_reachable(table: str) -> None:
    for sql in (f"SELECT (null::{table}).*", f"SELECT null::{table}[]", f"SELECT {table} 'x'"):
        assert _refused(sql) == "forbidden_type", sql
