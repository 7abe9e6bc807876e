"""The differential oracle: a guarded query on the shared database, as a superuser (no RLS),
must return exactly what the original returns on a database holding one tenant's rows only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from pglast import parser
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlguard import SqlGuard
from tests.conftest import PgDatabase, PgServer, create_database, drop_database

from .corpus import COUNTRIES, SCHEMA, SHARED_TABLES, TENANT_TABLES, TENANTS, tenant_rows

COLUMNS = {
    "countries": ("code", "name", "region"),
    "customers": ("tenant_id", "id", "name", "country", "segment", "created_at"),
    "orders": ("tenant_id", "id", "customer_id", "status", "total", "created_at"),
    "order_items": ("tenant_id", "order_id", "line", "product", "quantity", "unit_price"),
}


def make_guard() -> SqlGuard:
    return SqlGuard(TENANT_TABLES, SHARED_TABLES)


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, date):
        return f"DATE '{value.isoformat()}'"
    return repr(value)


def insert_statements(table: str, rows: list[tuple[object, ...]]) -> Iterator[str]:
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        values = ", ".join("(" + ", ".join(_literal(v) for v in row) + ")" for row in chunk)
        yield f"INSERT INTO {table} ({', '.join(COLUMNS[table])}) VALUES {values}"


async def load(conn: AsyncConnection, tenants: tuple[str, ...], scale: int = 1) -> None:
    for ddl in SCHEMA:
        await conn.exec_driver_sql(ddl)
    for statement in insert_statements("countries", list(COUNTRIES)):
        await conn.exec_driver_sql(statement)
    for tenant in tenants:
        for table, rows in tenant_rows(tenant, scale).items():
            for statement in insert_statements(table, rows):
                await conn.exec_driver_sql(statement)
    await conn.exec_driver_sql("ANALYZE")


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, Decimal):
        return value.normalize()
    return value


def _sqlstate(exc: DBAPIError) -> object:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def is_ordered(sql: str) -> bool:
    tree = json.loads(parser.parse_sql_json(sql))
    return "sortClause" in tree["stmts"][0]["stmt"].get("SelectStmt", {})


_COMPILED_PARAM = re.compile(r"(?<![\\\w]):tenant_id\b")


def compiled(sql: str) -> str:
    """What the driver receives from ``text(sql)``: the tenant as $1, escaped colons restored."""
    return _COMPILED_PARAM.sub("$1", sql).replace("\\:", ":")


def _nodes(value: object, kind: str, parent: dict[str, object] | None = None) -> list[tuple]:
    """Every ``kind`` node below ``value``, with the SelectStmt body that holds it."""
    found: list[tuple] = []
    if isinstance(value, list):
        for item in value:
            found += _nodes(item, kind, parent)
    elif isinstance(value, dict):
        for key, child in value.items():
            if key == kind:
                found.append((child, parent))
            holder = child if key == "SelectStmt" else parent
            found += _nodes(child, kind, holder)  # type: ignore[arg-type]
    return found


def assert_confined(sql: str) -> None:
    """Every tenant table in the rewrite sits in the filtered subquery; bare names are CTEs."""
    tree = json.loads(parser.parse_sql_json(sql))
    ctes = {cte["ctename"] for cte, _ in _nodes(tree, "CommonTableExpr")}
    for rv, select in _nodes(tree, "RangeVar"):
        if "schemaname" not in rv:
            assert rv["relname"] in ctes, sql
            continue
        assert rv["schemaname"] == "public", sql
        if rv["relname"] not in TENANT_TABLES:
            continue
        assert select is not None, sql
        where = select["whereClause"]["A_Expr"]
        assert where["lexpr"]["ColumnRef"]["fields"] == [{"String": {"sval": "tenant_id"}}], sql
        assert where["rexpr"]["ParamRef"]["number"] == 1, sql
        assert select["fromClause"] == [{"RangeVar": rv}], sql
        assert set(select) <= {"targetList", "fromClause", "whereClause", "limitOption", "op"}


class Oracle:
    """Runs queries on one event loop over one connection per database."""

    def __init__(self, server: PgServer, shared: PgDatabase | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = server
        self.guard = make_guard()
        self.own_shared = shared is None
        if shared is None:
            shared = create_database(server, "sqlguard_shared")
        self.shared_db = shared
        self.tenant_dbs = {t: create_database(server, f"sqlguard_{t}") for t in TENANTS}
        self.engines: list[AsyncEngine] = []
        self.shared = self._run(self._connect(shared.admin_url, TENANTS))
        self.single = {
            t: self._run(self._connect(db.admin_url, (t,))) for t, db in self.tenant_dbs.items()
        }
        self.compared = 0
        self.nonempty = 0
        self.errors = 0

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _connect(self, url: str, tenants: tuple[str, ...]) -> AsyncConnection:
        engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
        self.engines.append(engine)
        conn = await engine.connect()
        await load(conn, tenants)
        return conn

    def close(self) -> None:
        async def dispose() -> None:
            for conn in [self.shared, *self.single.values()]:
                await conn.close()
            for engine in self.engines:
                await engine.dispose()

        self._run(dispose())
        self.loop.close()
        for db in self.tenant_dbs.values():
            drop_database(self.server, db)
        if self.own_shared:
            drop_database(self.server, self.shared_db)

    def tally(self) -> Oracle:
        """A view sharing the databases, with counters of its own (one per test module)."""
        view = object.__new__(Oracle)
        view.__dict__.update(self.__dict__)
        view.compared = view.nonempty = view.errors = 0
        return view

    async def _rows(self, conn: AsyncConnection, statement: Any) -> list[tuple[Any, ...]]:
        result = await (
            conn.exec_driver_sql(statement)
            if isinstance(statement, str)
            else conn.execute(statement)
        )
        return [tuple(_norm(v) for v in row) for row in result.all()]

    def check(self, sql: str, tenant: str) -> int:
        """Assert the oracle for ``sql`` as ``tenant``; the number of rows compared."""
        with tenant_scope(Tenant(tenant)):
            guarded = self.guard.rewrite(sql)
        assert_confined(compiled(guarded.sql))
        try:
            want = self._run(self._rows(self.single[tenant], sql))
        except DBAPIError as exc:
            error: DBAPIError | None = exc
        else:
            error = None
        if error is not None:
            # an invalid query must stay invalid, with the same error, never read anything
            with pytest.raises(DBAPIError) as info:
                self._run(self._rows(self.shared, guarded.statement))
            assert _sqlstate(info.value) == _sqlstate(error), (sql, guarded.sql)
            self.errors += 1
            return 0
        got = self._run(self._rows(self.shared, guarded.statement))
        if is_ordered(sql):
            assert got == want, (sql, guarded.sql)
        else:
            assert Counter(got) == Counter(want), (sql, guarded.sql)
        self.compared += 1
        self.nonempty += bool(want)
        return len(want)

    def fetch_shared(self, sql: str) -> list[tuple[Any, ...]]:
        return self._run(self._rows(self.shared, text(sql)))  # type: ignore[no-any-return]
