"""SqlGuard's contract without a database: scope, binding, cache, configuration."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import TextClause

from asgi_tenancy import (
    IsolationConfigError,
    Tenant,
    TenantContextError,
    UnsafeQuery,
    central_scope,
    tenant_scope,
)
from asgi_tenancy.sqlguard import GuardedQuery, SqlGuard
from tests.sqlguard.oracle import make_guard

ACME = Tenant("acme")


def test_rewrite_outside_a_tenant_scope_raises_even_when_cached() -> None:
    guard = make_guard()
    with tenant_scope(ACME):
        guard.rewrite("SELECT * FROM orders")
    with pytest.raises(TenantContextError):
        guard.rewrite("SELECT * FROM orders")
    with central_scope(reason="test"), pytest.raises(TenantContextError):
        guard.rewrite("SELECT * FROM orders")


def test_the_tenant_is_a_bound_parameter_never_text() -> None:
    guard = make_guard()
    with tenant_scope(Tenant("tenant-7f3a")):
        query = guard.rewrite("SELECT id FROM orders o WHERE o.status = 'paid'")
    assert isinstance(query, GuardedQuery)
    assert isinstance(query.statement, TextClause)
    assert "tenant-7f3a" not in query.sql
    assert query.params == {"tenant_id": "tenant-7f3a"}
    compiled = query.statement.compile(dialect=postgresql.dialect())
    assert "tenant-7f3a" not in str(compiled)
    assert compiled.params == {"tenant_id": "tenant-7f3a"}
    assert query.tables == frozenset({"orders"})


def test_cached_rewrites_bind_each_tenant_separately() -> None:
    guard = make_guard()
    sql = "SELECT count(*) FROM customers"
    with tenant_scope(ACME):
        first = guard.rewrite(sql)
    with tenant_scope(Tenant("globex")):
        second = guard.rewrite(sql)
    assert first.sql == second.sql
    assert first.statement.compile().params == {"tenant_id": "acme"}
    assert second.statement.compile().params == {"tenant_id": "globex"}


def test_queries_over_shared_tables_only_bind_nothing() -> None:
    with tenant_scope(ACME):
        query = make_guard().rewrite("SELECT * FROM countries")
    assert query.params == {}
    assert query.tables == frozenset({"countries"})


def test_the_cache_is_bounded() -> None:
    guard = SqlGuard({"orders": "tenant_id"}, cache_size=3)
    with tenant_scope(ACME):
        for i in range(10):
            guard.rewrite(f"SELECT {i} FROM orders")
        with pytest.raises(UnsafeQuery):
            guard.rewrite("SELECT * FROM nowhere")
    assert len(guard._cache) == 3


def test_refusals_are_cached_with_their_reason() -> None:
    guard = make_guard()
    with tenant_scope(ACME):
        for _ in range(2):
            with pytest.raises(UnsafeQuery) as info:
                guard.rewrite("SELECT * FROM pg_class")
            assert info.value.reason == "unknown_table"
            assert info.value.status_code == 400
            assert info.value.code == "unsafe_query"


def test_non_string_input_is_refused() -> None:
    with tenant_scope(ACME), pytest.raises(UnsafeQuery) as info:
        make_guard().rewrite(b"SELECT 1")  # type: ignore[arg-type]
    assert info.value.reason == "parse_error"


def test_function_allow_list_can_be_narrowed_but_never_opened_to_dangerous_names() -> None:
    guard = SqlGuard({"orders": "tenant_id"}, functions={"count"})
    with tenant_scope(ACME):
        guard.rewrite("SELECT count(*) FROM orders")
        with pytest.raises(UnsafeQuery) as info:
            guard.rewrite("SELECT lower(status) FROM orders")
    assert info.value.reason == "forbidden_function"
    for name in ("set_config", "pg_sleep", "current_setting", "dblink_exec", "lo_export"):
        with pytest.raises(IsolationConfigError):
            SqlGuard({"orders": "tenant_id"}, functions={"count", name})


def test_limits_are_configurable() -> None:
    guard = SqlGuard({"orders": "tenant_id"}, max_length=40, max_depth=3)
    with tenant_scope(ACME):
        guard.rewrite("SELECT ((1)) FROM orders")
        for sql in (
            "SELECT 1 FROM orders WHERE status = 'a very long literal'",
            "SELECT ((((1))))",
        ):
            with pytest.raises(UnsafeQuery) as info:
                guard.rewrite(sql)
            assert info.value.reason == "too_complex"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tenant_tables": {}},
        {"tenant_tables": {"orders": "tenant_id"}, "shared_tables": ["orders"]},
        {"tenant_tables": {"": "tenant_id"}},
        {"tenant_tables": {"orders": ""}},
        {"tenant_tables": {"orders": "tenant_id"}, "schema": "pg_catalog"},
        {"tenant_tables": {"orders": "tenant_id"}, "schema": "information_schema"},
        {"tenant_tables": {"orders": "tenant_id"}, "max_length": 0},
        {"tenant_tables": {"orders": "tenant_id"}, "cache_size": -1},
    ],
)
def test_configuration_that_would_not_isolate_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(IsolationConfigError):
        SqlGuard(**kwargs)  # type: ignore[arg-type]


def _metadata() -> MetaData:
    metadata = MetaData()
    Table("orders", metadata, Column("tenant_id", Text), Column("id", Integer))
    Table("customers", metadata, Column("tenant_id", Text), Column("id", Integer))
    Table("countries", metadata, Column("code", Text))
    Table("secrets", metadata, Column("value", Text))
    return metadata


def test_from_metadata_finds_tenant_tables_and_takes_shared_ones_by_name() -> None:
    guard = SqlGuard.from_metadata(_metadata(), shared=["countries"])
    assert guard.tables == {"orders": "tenant_id", "customers": "tenant_id", "countries": None}
    with tenant_scope(ACME):
        with pytest.raises(UnsafeQuery) as info:
            guard.rewrite("SELECT * FROM secrets")
        assert info.value.reason == "unknown_table"
        assert guard.rewrite("SELECT * FROM orders JOIN countries ON true").params


def test_from_metadata_refuses_a_shared_table_with_a_tenant_column() -> None:
    with pytest.raises(IsolationConfigError):
        SqlGuard.from_metadata(_metadata(), shared=["orders"])
    with pytest.raises(IsolationConfigError):
        SqlGuard.from_metadata(_metadata(), shared=["missing"])


@pytest.mark.parametrize("schema", [None, "public"])
def test_schema_per_tenant_tables_are_left_to_the_search_path_and_never_qualified(
    schema: str | None,
) -> None:
    guard = SqlGuard({"orders": None}, schema=schema)
    with tenant_scope(ACME):
        query = guard.rewrite("SELECT * FROM orders")
        assert query.sql == "SELECT * FROM orders"
        assert query.params == {}
        for sql in ("SELECT * FROM public.orders", "SELECT * FROM tenant_b.orders"):
            with pytest.raises(UnsafeQuery) as info:
                guard.rewrite(sql)
            assert info.value.reason == "schema_not_allowed"


def test_the_statement_text_is_the_callers_outside_table_references() -> None:
    sql = "SELECT /* keep */ o.id,\n  'a b' AS t FROM orders AS o -- note\nWHERE o.id > 1"
    with tenant_scope(ACME):
        query = make_guard().rewrite(sql)
    assert query.sql.startswith("SELECT /* keep */ o.id,\n  'a b' AS t FROM ")
    assert query.sql.endswith(" AS o -- note\nWHERE o.id > 1")


def test_every_reason_code_is_documented() -> None:
    from pathlib import Path

    from asgi_tenancy.sqlguard import REASONS

    page = (Path(__file__).parents[2] / "docs" / "sqlguard.md").read_text()
    for reason in REASONS:
        assert f"| `{reason}` |" in page, reason


def test_importing_the_cli_loads_neither_sqlalchemy_nor_pglast() -> None:
    import subprocess
    import sys

    code = (
        "import sys, asgi_tenancy.cli\n"
        "print(','.join(m for m in ('sqlalchemy', 'pglast') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_recursive_ctes_can_be_refused() -> None:
    sql = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT * FROM n"
    with tenant_scope(ACME):
        SqlGuard({"orders": "tenant_id"}).rewrite(sql)
        with pytest.raises(UnsafeQuery) as info:
            SqlGuard({"orders": "tenant_id"}, allow_recursive=False).rewrite(sql)
    assert info.value.reason == "too_complex"


def test_the_tenant_filter_is_a_barrier_unless_turned_off() -> None:
    with tenant_scope(ACME):
        fenced = make_guard().rewrite("SELECT id FROM orders")
        plain = SqlGuard({"orders": "tenant_id"}, barrier=False).rewrite("SELECT id FROM orders")
    assert "= :tenant_id OFFSET 0)" in fenced.sql
    assert "OFFSET" not in plain.sql


def test_the_bind_scan_reads_what_sqlalchemy_reads() -> None:
    import random

    from asgi_tenancy.sqlguard._splice import _BIND, _binds

    rnd = random.Random(3)
    for _ in range(50_000):
        sample = "".join(rnd.choice("ab_:\\ \u00e91\n") for _ in range(rnd.randrange(12)))
        assert _binds(sample) == _BIND.findall(sample), sample


def test_the_statement_is_what_text_builds() -> None:
    from sqlalchemy import text
    from sqlalchemy.dialects.postgresql import asyncpg, psycopg

    sql = (
        "SELECT o.id, (ARRAY[1, 2])[o.id :id], E'\\x3a' FROM orders o"
        " WHERE o.status LIKE E'a\\x25' -- x"
    )
    with tenant_scope(ACME):
        query = make_guard().rewrite(sql)
    reference = text(query.sql).bindparams(tenant_id="acme")
    for dialect in (asyncpg.dialect(), psycopg.dialect()):
        ours, theirs = query.statement.compile(dialect=dialect), reference.compile(dialect=dialect)
        assert str(ours) == str(theirs)
        assert ours.params == theirs.params == {"tenant_id": "acme"}
