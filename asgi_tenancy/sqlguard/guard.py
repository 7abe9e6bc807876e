"""``SqlGuard``: one read-only SELECT over declared tables, confined to the current tenant."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql.elements import TextClause

from ..context import current_tenant
from ..errors import IsolationConfigError, UnsafeQuery
from ..sqlalchemy.query_scoping import ALLOW_UNSCOPED
from ._allowlist import DEFAULT_FUNCTIONS, NEVER_ALLOWED
from ._analyze import Edit, TableRule, analyze
from ._limits import check_limits
from ._parser import parse, tokens_before
from ._reasons import PARSE_ERROR, TOO_COMPLEX, UNSUPPORTED_SYNTAX
from ._splice import TENANT_PARAM, splice

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["GuardedQuery", "SqlGuard"]

_log = logging.getLogger("asgi_tenancy.sqlguard")

DEFAULT_MAX_LENGTH = 20_000
DEFAULT_MAX_DEPTH = 100
DEFAULT_CACHE_SIZE = 1_024
_BOUND_PER_QUERY = 8


@dataclass(frozen=True, slots=True)
class GuardedQuery:
    """A rewritten query: ``statement`` binds the tenant; ``sql`` is its ``text()`` source."""

    sql: str
    params: Mapping[str, str]
    statement: TextClause
    tables: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Rewrite:
    sql: str
    statement: TextClause
    uses_tenant: bool
    tables: frozenset[str]
    # the statement bound for the last few tenants: binding copies the clause (~15 us)
    bound: dict[str, GuardedQuery] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    message: str
    hint: str | None


def _config_error(message: str, hint: str) -> IsolationConfigError:
    return IsolationConfigError(message, hint=hint)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name or "\x00" in name or len(name.encode()) > 63:
        raise _config_error(f"invalid {kind} name", "use a PostgreSQL identifier (1-63 bytes)")
    return name


def _table_form_start(sql: str, b: bytes, edit: Edit) -> Edit:
    # ``TABLE orders`` is replaced from the keyword on: ``SELECT * FROM (...) AS orders``
    name, char_start = tokens_before(sql, len(b[: edit.start].decode()))
    if name != "TABLE":
        raise UnsafeQuery(UNSUPPORTED_SYNTAX, "unexpected TABLE statement")
    return replace(edit, start=len(sql[:char_start].encode()))


class SqlGuard:
    """Refuse or rewrite untrusted SQL so that it reads only the current tenant's rows.

    ``tenant_tables`` maps each tenant table to its tenant column (``None``: schema-per-tenant,
    the session's ``search_path`` confines it); ``shared_tables`` are readable by every tenant.
    Limits, the function allow-list and the cache are documented in docs/sqlguard.md.
    """

    def __init__(
        self,
        tenant_tables: Mapping[str, str | None],
        shared_tables: Iterable[str] = (),
        *,
        schema: str | None = "public",
        functions: Iterable[str] | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_depth: int = DEFAULT_MAX_DEPTH,
        cache_size: int = DEFAULT_CACHE_SIZE,
        allow_recursive: bool = True,
    ) -> None:
        rules: dict[str, TableRule] = {}
        for name, column in dict(tenant_tables).items():
            _check_name("table", name)
            if column is not None:
                _check_name("tenant column", column)
            rules[name] = TableRule(name, column, shared=False)
        for name in shared_tables:
            _check_name("table", name)
            if name in rules:
                raise _config_error(
                    f"table {name!r} is declared both tenant and shared",
                    "declare each table once",
                )
            rules[name] = TableRule(name, None, shared=True)
        if not rules:
            raise _config_error("no tables declared", "pass tenant_tables and/or shared_tables")
        if schema is not None:
            _check_name("schema", schema)
            if schema == "information_schema" or schema.startswith("pg_"):
                raise _config_error("schema must hold application tables", "use e.g. 'public'")
        chosen = DEFAULT_FUNCTIONS if functions is None else frozenset(f.lower() for f in functions)
        forbidden = sorted(f for f in chosen if NEVER_ALLOWED.match(f))
        if forbidden:
            raise _config_error(
                f"functions never allowed in guarded SQL: {', '.join(forbidden)}",
                "remove them from functions=",
            )
        for label, value in (
            ("max_length", max_length),
            ("max_depth", max_depth),
            ("cache_size", cache_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _config_error(f"{label} must be a non-negative int", f"check {label}=")
        if max_length < 1 or max_depth < 1:
            raise _config_error("limits must be at least 1", "check max_length= and max_depth=")
        self._rules: Mapping[str, TableRule] = rules
        self._schema = schema
        self._functions = chosen
        self._max_length = max_length
        self._max_depth = max_depth
        self._cache_size = cache_size
        self._allow_recursive = bool(allow_recursive)
        self._cache: OrderedDict[str, _Rewrite | _Refusal] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(
        cls,
        metadata: MetaData,
        tenant_column: str = "tenant_id",
        shared: Iterable[str] = (),
        **options: Any,
    ) -> SqlGuard:
        """Tables of ``metadata`` with ``tenant_column`` become tenant tables; ``shared`` named."""
        schema = options.get("schema", "public")
        tenant: dict[str, str | None] = {}
        columns: dict[str, set[str]] = {}
        for table in metadata.tables.values():
            if table.schema not in (None, schema):
                continue
            columns[table.name] = {c.name for c in table.columns}
            if tenant_column in columns[table.name]:
                tenant[table.name] = tenant_column
        shared_names = list(shared)
        for name in shared_names:
            if name not in columns:
                raise _config_error(
                    f"shared table {name!r} is not in the metadata", "check shared="
                )
            if name in tenant:
                raise _config_error(
                    f"shared table {name!r} has a {tenant_column!r} column",
                    "tables with a tenant column are always tenant tables",
                )
        return cls(tenant, shared_names, **options)

    @property
    def tables(self) -> Mapping[str, str | None]:
        """Declared tables and their tenant column (``None`` for shared tables)."""
        return {name: rule.tenant_column for name, rule in self._rules.items()}

    def rewrite(self, sql: str) -> GuardedQuery:
        """Refuse ``sql`` with ``UnsafeQuery`` or rewrite it for the current tenant.

        Outside a tenant scope raises ``TenantContextError``, cached query or not.
        """
        tenant = current_tenant()
        result = self._cached(sql)
        if isinstance(result, _Refusal):
            raise UnsafeQuery(result.reason, result.message, hint=result.hint)
        query = result.bound.get(tenant.id)
        if query is not None:
            return query
        if result.uses_tenant:
            query = GuardedQuery(
                result.sql,
                MappingProxyType({TENANT_PARAM: tenant.id}),
                result.statement.bindparams(**{TENANT_PARAM: tenant.id}),
                result.tables,
            )
        else:
            query = GuardedQuery(result.sql, MappingProxyType({}), result.statement, result.tables)
        if self._cache_size:
            if len(result.bound) >= _BOUND_PER_QUERY:
                result.bound.clear()
            result.bound[tenant.id] = query
        return query

    def _cached(self, sql: object) -> _Rewrite | _Refusal:
        if not isinstance(sql, str):
            return _Refusal(PARSE_ERROR, "the query must be a string", None)
        with self._lock:
            hit = self._cache.get(sql)
            if hit is not None:
                self._cache.move_to_end(sql)
                return hit
        try:
            result: _Rewrite | _Refusal = self._rewrite(sql)
        except UnsafeQuery as exc:
            result = _Refusal(exc.reason, exc.message, exc.hint)
        except RecursionError:
            result = _Refusal(TOO_COMPLEX, "query nests too deeply", None)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            # a parse tree shape the analysis did not expect: refuse, never guess
            _log.warning("sqlguard: unexpected parse tree shape", exc_info=True)
            result = _Refusal(UNSUPPORTED_SYNTAX, "query shape is not supported", None)
        if self._cache_size:
            with self._lock:
                self._cache[sql] = result
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def _rewrite(self, sql: str) -> _Rewrite:
        check_limits(sql, max_length=self._max_length, max_depth=self._max_depth)
        tree = parse(sql)
        b = sql.encode("utf-8", "surrogatepass")
        analysis, start, end = analyze(
            tree,
            b,
            rules=self._rules,
            schema=self._schema,
            functions=self._functions,
            max_depth=self._max_depth,
            allow_recursive=self._allow_recursive,
        )
        edits = [_table_form_start(sql, b, e) if e.table_form else e for e in analysis.edits]
        rewritten = splice(b, start, end, edits, self._schema)
        uses_tenant = any(e.rule.tenant_column is not None for e in analysis.edits)
        return _Rewrite(rewritten, text(rewritten), uses_tenant, frozenset(analysis.tables))

    async def run(
        self,
        session: AsyncSession,
        sql: str,
        max_rows: int = 1000,
        timeout_ms: int = 2000,
    ) -> Sequence[RowMapping]:
        """Rewrite ``sql`` and run it read-only with a timeout; at most ``max_rows`` rows.

        A session with no transaction open gets one, rolled back at the end. In an open
        transaction the query runs inside a savepoint that is rolled back, which undoes the
        READ ONLY mode and the timeout and leaves the caller's transaction as it was.
        """
        for label, value in (("max_rows", max_rows), ("timeout_ms", timeout_ms)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be a positive int")
        query = self.rewrite(sql)
        nested = session.in_transaction()
        transaction = session.begin_nested() if nested else session.begin()
        # The guard wrote these statements: QueryScoping, which refuses raw SQL in a tenant
        # scope, lets them through (RLS and schema bindings still apply). Not the query when it
        # reads a table the guard did not filter (tenant column None: schema-per-tenant): with
        # no database wall behind it, QueryScoping refuses it instead.
        confined = {ALLOW_UNSCOPED: True}
        filtered = all(
            self._rules[name].shared or self._rules[name].tenant_column is not None
            for name in query.tables
        )
        async with transaction:
            await session.execute(text("SET TRANSACTION READ ONLY"), execution_options=confined)
            await session.execute(
                text("SELECT set_config('statement_timeout', :timeout, true)"),
                {"timeout": f"{timeout_ms}ms"},
                execution_options=confined,
            )
            await session.execute(
                text("SELECT set_config('standard_conforming_strings', 'on', true)"),
                execution_options=confined,
            )
            # the cap is applied by the server, so a huge result is never produced or sent
            capped = text(f"SELECT * FROM (\n{query.sql}\n) AS guarded_query LIMIT {max_rows}")
            result = await session.execute(
                capped, dict(query.params), execution_options=confined if filtered else {}
            )
            rows = result.mappings().all()
            await transaction.rollback()
        return rows
