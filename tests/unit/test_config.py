"""``strategy_from_env``: TENANCY_ISOLATION picks and builds a strategy, or refuses."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table

from asgi_tenancy import IsolationConfigError
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    QueryScoping,
    RowLevelSecurity,
    SchemaPerTenant,
    isolation_from_env,
    strategy_from_env,
)


def _metadata(*, shared_schema: str | None = None) -> MetaData:
    metadata = MetaData()
    Table(
        "projects", metadata, Column("tenant_id", String, primary_key=True), Column("id", Integer)
    )
    Table("currencies", metadata, Column("code", String, primary_key=True), schema=shared_schema)
    return metadata


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("row", RowLevelSecurity),
        ("query", QueryScoping),
        ("database", DatabasePerTenant),
        (" Row ", RowLevelSecurity),
    ],
)
def test_each_value_builds_its_strategy(value: str, kind: type) -> None:
    strategy = strategy_from_env(
        metadata=_metadata(), shared_tables={"currencies"}, environ={"TENANCY_ISOLATION": value}
    )
    assert isinstance(strategy, kind)


def test_schema_builds_with_shared_tables_in_the_shared_schema() -> None:
    strategy = strategy_from_env(
        metadata=_metadata(shared_schema="shared"),
        shared_tables={"currencies"},
        environ={"TENANCY_ISOLATION": "schema"},
    )
    assert isinstance(strategy, SchemaPerTenant)
    assert [t.name for t in strategy.tenant_tables()] == ["projects"]
    assert [t.name for t in strategy.shared_tables()] == ["currencies"]


def test_schema_refuses_a_shared_table_outside_the_shared_schema() -> None:
    with pytest.raises(IsolationConfigError, match="outside the shared schema"):
        strategy_from_env(
            metadata=_metadata(),
            shared_tables={"currencies"},
            environ={"TENANCY_ISOLATION": "schema"},
        )


def test_the_arguments_reach_the_strategy() -> None:
    strategy = strategy_from_env(
        metadata=_metadata(),
        tenant_column="tenant_id",
        shared_tables={"currencies"},
        options={"row": {"setting": "demo.tenant"}, "database": {"max_engines": 3}},
        environ={"TENANCY_ISOLATION": "row"},
    )
    assert isinstance(strategy, RowLevelSecurity)
    assert strategy.setting == "demo.tenant"
    assert strategy.shared_tables == {"currencies"}
    database = strategy_from_env(
        options={"database": {"max_engines": 3, "pool_size_per_engine": 1}},
        environ={"TENANCY_ISOLATION": "database"},
    )
    assert isinstance(database, DatabasePerTenant)
    assert database.engines.max_engines == 3


@pytest.mark.parametrize("value", ["rls", "none", "row;drop", "schema,row", "ROWS"])
def test_unknown_values_are_refused(value: str) -> None:
    with pytest.raises(IsolationConfigError, match="not an isolation strategy") as caught:
        strategy_from_env(metadata=_metadata(), environ={"TENANCY_ISOLATION": value})
    assert caught.value.hint is not None
    assert "row, schema, database, query" in caught.value.hint


def test_unset_uses_the_default_or_refuses() -> None:
    assert isolation_from_env({}, default="row") == "row"
    assert isolation_from_env({"TENANCY_ISOLATION": ""}, default="query") == "query"
    assert isolation_from_env({"TENANCY_ISOLATION": "schema"}, default="row") == "schema"
    with pytest.raises(IsolationConfigError, match="not set"):
        strategy_from_env(metadata=_metadata(), environ={})


def test_a_bad_default_is_refused_too() -> None:
    with pytest.raises(IsolationConfigError, match="not an isolation strategy"):
        isolation_from_env({}, default="everything")


def test_strategies_that_need_metadata_refuse_without_it() -> None:
    for value in ("row", "schema", "query"):
        with pytest.raises(IsolationConfigError, match="needs the application's MetaData"):
            strategy_from_env(environ={"TENANCY_ISOLATION": value})


def test_options_for_an_unknown_strategy_are_refused() -> None:
    with pytest.raises(IsolationConfigError, match="unknown strategies: rls"):
        strategy_from_env(
            metadata=_metadata(), options={"rls": {}}, environ={"TENANCY_ISOLATION": "row"}
        )


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_ISOLATION", "query")
    assert isinstance(
        strategy_from_env(metadata=_metadata(), shared_tables={"currencies"}), QueryScoping
    )
