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
    return SqlGuard(TENANT_TABLES, SHARED_TABLES, columns=COLUMNS)


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
        assert set(select) <= {
            "targetList",
            "fromClause",
            "whereClause",
            "limitOption",
            "limitOffset",
            "op",
        }


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


_DEPENDENCIES = """
SELECT 'function' AS kind, n.nspname AS schema, p.proname AS name
  FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
  JOIN pg_proc p ON p.oid = d.refobjid JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_proc'::regclass
   AND w.ev_class = 'guard_probe'::regclass
UNION
SELECT 'operator', n.nspname, o.oprname
  FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
  JOIN pg_operator o ON o.oid = d.refobjid JOIN pg_namespace n ON n.oid = o.oprnamespace
 WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_operator'::regclass
   AND w.ev_class = 'guard_probe'::regclass
UNION
SELECT 'type', n.nspname, t.typname
  FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
  JOIN pg_type t ON t.oid = d.refobjid JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_type'::regclass
   AND w.ev_class = 'guard_probe'::regclass
UNION
SELECT 'relation', n.nspname, c.relname
  FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
  JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
   AND w.ev_class = 'guard_probe'::regclass AND c.relname <> 'guard_probe'
"""


def _literal_sql(sql: str, tenant: str) -> str:
    return compiled(sql).replace("$1", "'" + tenant + "'")


class Resolution:
    """What the server resolved a rewritten query to: its objects, its plan, its columns."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle

    async def _objects(self, sql: str) -> set[tuple[str, str, str]]:
        conn = self.oracle.shared
        await conn.exec_driver_sql("BEGIN")
        try:
            await conn.exec_driver_sql(
                f"CREATE TEMP VIEW guard_probe AS SELECT 1 FROM (\n{sql}\n) q"
            )
            result = await conn.exec_driver_sql(_DEPENDENCIES)
            objects = {tuple(row) for row in result.all()}
            # built-ins are pinned (no pg_depend rows): read what the server resolved from its
            # own deparse of the view, which names every function, operator and cast
            definition = await conn.scalar(text("SELECT pg_get_viewdef('guard_probe'::regclass)"))
            found: set[tuple[str, str]] = set()
            _walk_tree(json.loads(parser.parse_sql_json(definition)), found)
            return objects | {(kind, "", name) for kind, name in found}  # type: ignore[misc]
        finally:
            await conn.exec_driver_sql("ROLLBACK")

    async def _plan(self, sql: str) -> list[object]:
        result = await self.oracle.shared.exec_driver_sql(f"EXPLAIN (VERBOSE, FORMAT JSON) {sql}")
        return result.scalar()  # type: ignore[no-any-return]

    async def _columns(self, sql: str) -> list[str]:
        result = await self.oracle.shared.exec_driver_sql(f"SELECT * FROM (\n{sql}\n) q LIMIT 0")
        return list(result.keys())

    def objects(self, sql: str, tenant: str = "acme") -> set[tuple[str, str, str]]:
        return self.oracle._run(self._objects(_literal_sql(sql, tenant)))  # type: ignore[no-any-return]

    def plan(self, sql: str, tenant: str = "acme") -> list[object]:
        return self.oracle._run(self._plan(_literal_sql(sql, tenant)))  # type: ignore[no-any-return]

    def columns(self, sql: str) -> list[str]:
        return self.oracle._run(self._columns(sql))  # type: ignore[no-any-return]

    def explain_raw(self, sql: str) -> bool:
        """Whether the server accepts ``sql`` (planned, never executed)."""

        async def attempt() -> bool:
            conn = self.oracle.shared
            await conn.exec_driver_sql("BEGIN")
            try:
                await conn.exec_driver_sql(f"EXPLAIN {sql}")
                return True
            except DBAPIError:
                return False
            finally:
                await conn.exec_driver_sql("ROLLBACK")

        return self.oracle._run(attempt())  # type: ignore[no-any-return]


def _walk_tree(value: object, found: set[tuple[str, str]]) -> None:
    if isinstance(value, list):
        for item in value:
            _walk_tree(item, found)
    elif isinstance(value, dict):
        for key, child in value.items():
            if key == "FuncCall":
                names = [n["String"]["sval"] for n in child["funcname"]]
                found.add(("function", ".".join(names)))
            elif key == "A_Expr" and "name" in child:
                names = [n["String"]["sval"] for n in child["name"]]
                found.add(("operator", ".".join(names)))
            elif key == "TypeName" or (key == "typeName" and isinstance(child, dict)):
                names = [n["String"]["sval"] for n in child.get("names", [])]
                found.add(("type", ".".join(names)))
            elif key == "RangeVar":
                found.add(("relation", f"{child.get('schemaname', '')}.{child['relname']}"))
            _walk_tree(child, found)


_PLAN_KEYS = frozenset(
    {
        "Output",
        "Filter",
        "Join Filter",
        "Hash Cond",
        "Merge Cond",
        "Index Cond",
        "Recheck Cond",
        "One-Time Filter",
        "Sort Key",
        "Group Key",
        "Function Call",
        "Order By",
        "Cache Key",
        "Presorted Key",
        "Run Condition",
        "Hash Key",
        "Window",
    }
)
_CALL = re.compile(r'("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)\(')
_STRING = re.compile(r"'(?:[^']|'')*'")
_MULTIWORD_TYPES = re.compile(
    r"::(character varying|bit varying|double precision|time(?:stamp)? with(?:out)? time zone)"
)
_CAST = re.compile(r'::(?:"[^"]+"|[A-Za-z_][\w.]*)(?:\(\d+(?:\s*,\s*\d+)?\))?')


def plan_calls(plan: object, found: set[str] | None = None) -> set[str]:
    """Names written as calls ``name(`` in a plan's expressions (string literals removed)."""
    found = set() if found is None else found
    if isinstance(plan, list):
        for item in plan:
            plan_calls(item, found)
    elif isinstance(plan, dict):
        for key, child in plan.items():
            if key in _PLAN_KEYS:
                for expression in child if isinstance(child, list) else [child]:
                    plain = _MULTIWORD_TYPES.sub("::t", _STRING.sub("''", str(expression)))
                    for name in _CALL.findall(_CAST.sub("::t", plain)):
                        found.add(name.strip('"'))
            else:
                plan_calls(child, found)
    return found
