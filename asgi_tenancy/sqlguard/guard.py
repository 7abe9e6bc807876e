"""``SqlGuard``: one read-only SELECT over declared tables, confined to the current tenant."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, text
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql.elements import BindParameter, TextClause

from ..context import current_tenant
from ..errors import IsolationConfigError, UnsafeQuery
from ..tenant import Tenant
from ._allowlist import FUNCTIONS
from ._analyze import TableRule, analyze
from ._limits import check_limits, check_text
from ._parser import parse
from ._reasons import PARSE_ERROR, TOO_COMPLEX, UNKNOWN_COLUMN, UNSUPPORTED_SYNTAX
from ._run import execute, load_columns
from ._splice import PLACEHOLDER, TENANT_PARAM, splice

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["GuardedQuery", "SqlGuard"]

_log = logging.getLogger("asgi_tenancy.sqlguard")

DEFAULT_MAX_LENGTH = 20_000
DEFAULT_MAX_DEPTH = 100
DEFAULT_CACHE_SIZE = 1_024
DEFAULT_MAX_BYTES = 1_000_000
_BOUND_PER_QUERY = 8

ReaderRole = str | Callable[[Tenant], str] | None


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


def _statement(sql: str, tenant_id: str | None) -> TextClause:
    """``text(sql)`` with the tenant bound, built directly: the splice already checked, with
    SQLAlchemy's own pattern, that ``:tenant_id`` is the only bind parameter in ``sql``, so the
    regex pass of ``text()`` over the whole statement would find exactly that (see
    test_the_statement_is_what_text_builds)."""
    clause = TextClause.__new__(TextClause)
    clause.text = sql
    clause._bindparams = {TENANT_PARAM: BindParameter(TENANT_PARAM, tenant_id, type_=String())}
    return clause


def _config_error(message: str, hint: str) -> IsolationConfigError:
    return IsolationConfigError(message, hint=hint)


def check_name(kind: str, name: object) -> str:
    """A PostgreSQL identifier (1-63 bytes, no NUL), or ``IsolationConfigError``."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name.encode()) > 63:
        raise _config_error(f"invalid {kind} name", "use a PostgreSQL identifier (1-63 bytes)")
    return name


def _columns(table: str, names: Iterable[str]) -> tuple[str, ...]:
    out = tuple(check_name("column", n) for n in names)
    if not out or len(set(out)) != len(out):
        raise _config_error(f"columns of {table!r}: none, or a name twice", "check columns=")
    return out


class SqlGuard:
    """Refuse or rewrite untrusted SQL so that it reads only the current tenant's rows.

    ``tenant_tables`` maps each tenant table to its tenant column (``None``: schema-per-tenant,
    the session's ``search_path`` confines it); ``shared_tables`` are readable by every tenant;
    ``columns`` names each table's columns (``from_metadata`` fills it; ``run()`` reads the
    missing ones from the catalog once). Options are documented in docs/sqlguard.md.
    """

    def __init__(
        self,
        tenant_tables: Mapping[str, str | None],
        shared_tables: Iterable[str] = (),
        *,
        columns: Mapping[str, Iterable[str]] | None = None,
        schema: str | None = "public",
        functions: Iterable[str] | None = None,
        reader_role: ReaderRole = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_depth: int = DEFAULT_MAX_DEPTH,
        cache_size: int = DEFAULT_CACHE_SIZE,
        allow_recursive: bool = True,
        barrier: bool = True,
    ) -> None:
        known = {name: _columns(name, cols) for name, cols in dict(columns or {}).items()}
        rules: dict[str, TableRule] = {}
        for name, column in dict(tenant_tables).items():
            check_name("table", name)
            if column is not None:
                check_name("tenant column", column)
                if name in known and column not in known[name]:
                    raise _config_error(
                        f"tenant column {column!r} is not a column of {name!r}", "check columns="
                    )
            rules[name] = TableRule(name, column, shared=False, columns=known.get(name))
        for name in shared_tables:
            check_name("table", name)
            if name in rules:
                raise _config_error(
                    f"table {name!r} is declared both tenant and shared",
                    "declare each table once",
                )
            rules[name] = TableRule(name, None, shared=True, columns=known.get(name))
        if not rules:
            raise _config_error("no tables declared", "pass tenant_tables and/or shared_tables")
        stray = sorted(set(known) - set(rules))
        if stray:
            raise _config_error(f"columns given for undeclared tables: {stray}", "check columns=")
        if schema is not None:
            check_name("schema", schema)
            if schema == "information_schema" or schema.startswith("pg_"):
                raise _config_error("schema must hold application tables", "use e.g. 'public'")
        chosen = FUNCTIONS if functions is None else frozenset(f.lower() for f in functions)
        outside = sorted(chosen - FUNCTIONS)
        if outside:
            raise _config_error(
                f"functions that are not on the guard's allow-list: {', '.join(outside)}",
                "functions= can only narrow the allow-list (docs/sqlguard.md)",
            )
        if reader_role is not None and not callable(reader_role):
            check_name("reader role", reader_role)
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
        self._reader_role = reader_role
        self._max_length = max_length
        self._max_depth = max_depth
        self._cache_size = cache_size
        self._allow_recursive = bool(allow_recursive)
        self._barrier = bool(barrier)
        self._cache: OrderedDict[str, _Rewrite | _Refusal] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(
        cls,
        metadata: MetaData,
        tenant_column: str | None = "tenant_id",
        shared: Iterable[str] = (),
        **options: Any,
    ) -> SqlGuard:
        """Tables of ``metadata`` with ``tenant_column`` become tenant tables; ``shared`` named.

        ``tenant_column=None`` (schema per tenant): every table not in ``shared`` is a tenant
        table confined by the session's ``search_path``. Columns come from the metadata.
        """
        schema = options.get("schema", "public")
        tenant: dict[str, str | None] = {}
        columns: dict[str, tuple[str, ...]] = {}
        for table in metadata.tables.values():
            if table.schema not in (None, schema):
                continue
            columns[table.name] = tuple(c.name for c in table.columns)
        shared_names = list(shared)
        for name in shared_names:
            if name not in columns:
                raise _config_error(
                    f"shared table {name!r} is not in the metadata", "check shared="
                )
            if tenant_column is not None and tenant_column in columns[name]:
                raise _config_error(
                    f"shared table {name!r} has a {tenant_column!r} column",
                    "tables with a tenant column are always tenant tables",
                )
        for name, cols in columns.items():
            if name in shared_names:
                continue
            if tenant_column is None:
                tenant[name] = None
            elif tenant_column in cols:
                tenant[name] = tenant_column
        declared = set(tenant) | set(shared_names)
        return cls(
            tenant,
            shared_names,
            columns={name: cols for name, cols in columns.items() if name in declared},
            **options,
        )

    @property
    def tables(self) -> Mapping[str, str | None]:
        """Declared tables and their tenant column (``None`` for shared tables)."""
        return {name: rule.tenant_column for name, rule in self._rules.items()}

    @property
    def columns(self) -> Mapping[str, tuple[str, ...] | None]:
        """Declared tables and their known columns (``None``: not known yet)."""
        return {name: rule.columns for name, rule in self._rules.items()}

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
                _statement(result.sql, tenant.id),
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
        b = check_text(sql)
        check_limits(sql, max_length=self._max_length, max_depth=self._max_depth)
        tree = parse(sql)
        analysis, start, end = analyze(
            tree,
            b,
            rules=self._rules,
            schema=self._schema,
            functions=self._functions,
            max_depth=self._max_depth,
            allow_recursive=self._allow_recursive,
            placeholder=PLACEHOLDER,
            barrier=self._barrier,
        )
        rewritten = splice(sql, b, start, end, analysis)
        uses_tenant = analysis.placeholders > 0
        return _Rewrite(
            rewritten,
            _statement(rewritten, None) if uses_tenant else text(rewritten),
            uses_tenant,
            frozenset(analysis.tables),
        )

    # -- execution -------------------------------------------------------------------------

    def _missing_columns(self) -> list[str]:
        return [name for name, rule in self._rules.items() if rule.columns is None]

    def _learn_columns(self, found: Mapping[str, tuple[str, ...]]) -> None:
        rules = dict(self._rules)
        for name, cols in found.items():
            rule = rules[name]
            if rule.columns is None and cols and (rule.tenant_column in (None, *cols)):
                rules[name] = TableRule(rule.name, rule.tenant_column, rule.shared, cols)
        with self._lock:
            self._rules = rules
            self._cache.clear()  # rewrites made without the columns: make them again

    def reader_role_for(self, tenant: Tenant) -> str | None:
        """The role ``run()`` sets for ``tenant``'s queries, or ``None`` (no reader role)."""
        role = self._reader_role
        if callable(role):
            return check_name("reader role", role(tenant))
        return role

    async def run(
        self,
        session: AsyncSession,
        sql: str,
        max_rows: int = 1000,
        timeout_ms: int = 2000,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Sequence[RowMapping]:
        """Rewrite ``sql`` and run it read-only, as the reader role, with a timeout and caps.

        At most ``max_rows`` rows and ``max_bytes`` bytes (their text form), both enforced by
        the server as it produces rows. A session with no transaction open gets one, rolled
        back at the end; in an open transaction the query runs in a savepoint rolled back.
        Server errors become ``GuardedQueryFailed`` / ``GuardedResultTooLarge`` (400) or
        ``GuardedQueryTimeout`` (504).
        """
        for label, value in (
            ("max_rows", max_rows),
            ("timeout_ms", timeout_ms),
            ("max_bytes", max_bytes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be a positive int")
        tenant = current_tenant()
        missing = self._missing_columns()
        try:
            query: GuardedQuery | None = self.rewrite(sql)
        except UnsafeQuery as exc:
            if not (missing and exc.reason == UNKNOWN_COLUMN):
                raise  # refused before anything is sent
            query = None
        role = self.reader_role_for(tenant)

        async def prepare() -> tuple[GuardedQuery, bool]:
            guarded = query
            if missing:
                self._learn_columns(await load_columns(session, self._schema, missing))
                guarded = self.rewrite(sql)
            assert guarded is not None
            # Reading only tables it filtered, the guard confined the query: QueryScoping,
            # which refuses raw SQL in a tenant scope, lets it through. A query on a table the
            # guard did not filter (schema per tenant) has no wall behind it there: refused.
            rules = self._rules
            filtered = all(
                rules[name].shared or rules[name].tenant_column is not None
                for name in guarded.tables
            )
            return guarded, filtered

        return await execute(
            session,
            prepare,
            role=role,
            max_rows=max_rows,
            max_bytes=max_bytes,
            timeout_ms=timeout_ms,
        )
