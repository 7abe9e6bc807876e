"""QueryScoping: shared tables on any SQLAlchemy dialect, confined by the ORM alone.

No database feature backs it, so it holds against mistakes in ORM code, not against SQL the
application writes by hand (or that an attacker injects into it). What it does instead:

- every ORM select, update and delete of a tenant model, and every relationship load, gets the
  tenant predicate (``with_loader_criteria``, the tenant always a bound parameter), ANDed
  around the whole WHERE clause; new rows are stamped and a forged or changed tenant refused;
- a statement it cannot confine is refused inside a tenant scope, before any SQL is sent:
  ``text()``, ``exec_driver_sql()``, Core statements on tenant tables, SQL fragments
  (``text()`` or ``literal_column()``) inside ORM statements, raw tables inside ORM statements,
  and tables that are neither tenant nor declared shared;
- the refusal sits on the engine too, so ``session.connection()`` or the engine itself used
  inside a tenant scope cannot go around the session.

A statement that confines itself (the SQL guard's output, or one you checked) can be run with
``allow_unscoped(statement)``: the decision is visible in the code, never a default.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import MetaData, Table, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import visitors
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnClause, TextClause, quoted_name
from sqlalchemy.sql.operators import custom_op
from sqlalchemy.sql.selectable import Alias, Select, TableClause

from ..context import current_tenant_or_none, in_central_scope
from ..errors import IsolationConfigError, UnsafeQuery
from ..tenant import Tenant
from .binding import BOUND_KEY, TenantBoundSession
from .criteria import CRITERIA_KEY, TenantCriteria
from .rls import Finding
from .strategy import IsolationStrategy

if TYPE_CHECKING:
    from .database import TenantDatabase

__all__ = ["ALLOW_UNSCOPED", "QueryScoping", "allow_unscoped"]

ALLOW_UNSCOPED = "asgi_tenancy_allow_unscoped"  # execution option: the caller confines the SQL
_APPROVED = "asgi_tenancy_scoped"  # execution option set by the session hook, value _TOKEN
_TOKEN = object()
_SESSION_KEY = "asgi_tenancy.scoping_session"  # connection info: weakref to the session
_SCOPING_KEY = "asgi_tenancy.query_scoping"  # Session.info: the QueryScoping of the session
_E = TypeVar("_E", bound=Executable)


def allow_unscoped(statement: _E) -> _E:
    """Mark ``statement`` as confined by its author; QueryScoping then lets it run in a scope."""
    return statement.execution_options(**{ALLOW_UNSCOPED: True})


class _Shape:
    """What a statement touches, found by walking it once."""

    __slots__ = ("fragment", "mappers", "raw_tables", "tables")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.raw_tables: set[str] = set()  # tables read without an ORM entity to filter them
        self.mappers: set[Mapper[Any]] = set()
        self.fragment = False  # SQL the library cannot read: text, literal names, hints


# Custom operators (``column.op("...")``) render their string as SQL; only symbols are read as
# an operator, a word such as OR could reorder the statement around the tenant predicate.
_SAFE_OPERATOR = re.compile(r"[!#%&*+\-/<=>?@^~:]+\Z")


def _is_fragment(element: object) -> bool:
    if isinstance(element, TextClause):
        return True
    name = getattr(element, "name", None)
    if isinstance(name, quoted_name) and name.quote is False:
        return True  # rendered verbatim, unquoted
    if isinstance(element, ColumnClause) and element.is_literal:
        return element.name != "*"  # count(*) is the one literal allowed
    for pasted in ("_hints", "_statement_hints", "_prefixes", "_suffixes"):
        if getattr(element, pasted, None):
            return True  # hints, prefixes and suffixes are pasted into the SQL as they are
    operator = getattr(element, "operator", None)
    return isinstance(operator, custom_op) and not _SAFE_OPERATOR.match(operator.opstring)


def _hidden_criteria(element: Any) -> list[Any]:
    """Criteria the walk does not reach: loader options and ``relationship.and_()`` joins."""
    found: list[Any] = []
    for option in getattr(element, "_with_options", ()):
        criteria: Any = getattr(option, "where_criteria", None)
        if getattr(option, "deferred_where_criteria", False):
            entity = option.root_entity or getattr(option.entity, "class_", None)
            try:
                criteria = criteria._resolve_with_args(entity)
            except Exception:  # an unreadable lambda is refused, not trusted
                criteria = text("")
        if criteria is not None:
            found.append(criteria)
        for load in getattr(option, "context", ()):
            found.extend(getattr(load, "_extra_criteria", ()))
    for join in getattr(element, "_setup_joins", ()):
        found.extend(getattr(join[0], "_extra_criteria", ()))
    return found


SHAPE_CACHE_SIZE = 1_000  # distinct statement shapes; cleared when full (a few hundred KB)
_shapes: dict[Any, _Shape] = {}


def _cached_shape(statement: object) -> _Shape:
    """``_shape`` once per statement shape, keyed like SQLAlchemy's compiled cache.

    Two statements with one cache key compile to the same SQL text, so they touch the same
    tables and fragments; the key is memoized on the statement, where compilation reuses it.
    Statements SQLAlchemy cannot key (``None``) are walked every time.
    """
    generate = getattr(statement, "_generate_cache_key", None)
    cache_key = generate() if generate is not None else None
    if cache_key is None:
        return _shape(statement)
    shape = _shapes.get(cache_key.key)
    if shape is None:
        if len(_shapes) >= SHAPE_CACHE_SIZE:
            _shapes.clear()
        shape = _shapes[cache_key.key] = _shape(statement)
    return shape


def _shape(statement: object) -> _Shape:
    shape = _Shape()
    if isinstance(statement, visitors.ExternallyTraversible):
        _walk_select(statement, shape)
    else:
        shape.fragment = True
    return shape


def _walk_select(root: Any, shape: _Shape) -> None:
    """Walk one SELECT (or DML statement); each nested SELECT is a scope of its own."""
    # Raw (non-ORM) references to tables, by how many times each is met; the table inside an
    # ORM alias (aliased(Model)) is met once for that alias, and the alias carries criteria.
    raw: dict[TableClause, int] = {}
    raw_columns: set[TableClause] = set()
    in_orm_alias: dict[TableClause, int] = {}
    entities: set[TableClause] = set()  # tables this SELECT selects as plain ORM entities
    todo: list[Any] = [root]
    while todo:
        element = todo.pop()
        if element is not root and isinstance(element, Select):
            _walk_select(element, shape)
            continue
        annotations = getattr(element, "_annotations", None) or {}
        mapper = annotations.get("parentmapper")
        if mapper is not None:
            shape.mappers.add(mapper)
        if _is_fragment(element):
            shape.fragment = True
        if isinstance(element, TableClause):
            shape.tables.add(element.fullname)
            if mapper is None:
                raw[element] = raw.get(element, 0) + 1
            else:
                entities.update(mapper.tables)
        elif isinstance(element, ColumnClause) and isinstance(element.table, TableClause):
            shape.tables.add(element.table.fullname)
            if mapper is None:
                raw_columns.add(element.table)
            else:
                entities.add(element.table)
        elif isinstance(element, Alias) and isinstance(element.element, TableClause):
            inner = element.element
            if mapper is None:  # a Core alias: no criteria can follow it
                shape.raw_tables.add(inner.fullname)
            else:
                in_orm_alias[inner] = in_orm_alias.get(inner, 0) + 1
        todo.extend(_hidden_criteria(element))
        todo.extend(element.get_children())
    # A raw reference to the very table this SELECT also selects as an (unaliased) ORM entity
    # shares that entity's FROM, so the entity's criteria cover it: SQLAlchemy's own get() and
    # lazy loads are written that way. Any other raw reference would be read unfiltered.
    shape.raw_tables.update(table.fullname for table in raw_columns - entities)
    shape.raw_tables.update(
        table.fullname
        for table, count in raw.items()
        if table not in entities and count > in_orm_alias.get(table, 0)
    )


class _ScopedCriteria(TenantCriteria):
    """TenantCriteria that also refuses what it cannot confine, then approves the statement."""

    refuse_unchecked = True

    def __init__(self, strategy: QueryScoping) -> None:
        super().__init__(strategy.tenant_column)
        self._strategy = strategy

    def apply(
        self, state: ORMExecuteState, tenant_id: str, extra: Iterable[Mapper[Any]] = ()
    ) -> None:
        allowed = bool(state.execution_options.get(ALLOW_UNSCOPED))
        shape = _cached_shape(state.statement)
        if state.is_update and state.is_executemany:
            raise UnsafeQuery(
                "bulk_update_by_primary_key",
                "ORM bulk UPDATE by primary key is refused in a tenant scope",
                hint="use update(Model).where(...).values(...), or change loaded objects",
            )
        if not allowed:
            self._strategy._refuse_unconfined(shape, orm=state.is_orm_statement)
        if state.is_orm_statement:
            super().apply(state, tenant_id, extra=(*extra, *shape.mappers))
        state.update_execution_options(**{_APPROVED: _TOKEN})


class QueryScoping(IsolationStrategy):
    """Isolation by the ORM on tables shared by all tenants; any SQLAlchemy dialect.

    ``metadata`` lists the application's tables: those with ``tenant_column`` are tenant
    tables; every other one must be named in ``shared_tables`` (``validate()`` refuses an
    unclassified table, and a statement on one is refused inside a tenant scope).
    """

    name = "query"

    def __init__(
        self,
        *,
        metadata: MetaData,
        tenant_column: str = "tenant_id",
        shared_tables: Iterable[str] = (),
    ) -> None:
        if not isinstance(metadata, MetaData):
            raise IsolationConfigError(
                "QueryScoping needs the application's MetaData",
                hint="QueryScoping(metadata=Base.metadata, shared_tables={...})",
            )
        if not tenant_column:
            raise IsolationConfigError("the tenant column name cannot be empty")
        self.metadata = metadata
        self.tenant_column = tenant_column
        self.shared_tables = frozenset(shared_tables)
        self._criteria = _ScopedCriteria(self)

    # -- classification --------------------------------------------------------------------

    def _tables(self) -> Mapping[str, Table]:
        return {t.fullname: t for t in self.metadata.sorted_tables}

    def _is_shared(self, name: str) -> bool:
        table = self.metadata.tables.get(name)
        return (
            table is not None
            and self.tenant_column not in table.c
            and (name in self.shared_tables or table.name in self.shared_tables)
        )

    def _refuse_unconfined(self, shape: _Shape, *, orm: bool, trust_raw: bool = False) -> None:
        """Raise ``UnsafeQuery`` unless the criteria can confine every part of the statement."""
        if shape.fragment:
            raise UnsafeQuery(
                "raw_sql",
                "raw SQL (text(), literal_column(), a SQL string) is refused in a tenant scope",
                hint="write it with the ORM, or run a statement you confined yourself through "
                "allow_unscoped()",
            )
        for name in sorted(shape.tables):
            table = self.metadata.tables.get(name)
            if table is None or (self.tenant_column not in table.c and not self._is_shared(name)):
                raise UnsafeQuery(
                    "unregistered_table",
                    "a table that is neither a tenant table nor declared shared was refused",
                    hint="add the tenant column to it, or list it in shared_tables",
                )
            raw = name in shape.raw_tables and not trust_raw
            if self.tenant_column in table.c and (not orm or raw):
                raise UnsafeQuery(
                    "core_statement",
                    "a Core statement or raw table on a tenant table is refused in a tenant scope",
                    hint="query the mapped class instead of its Table",
                )

    # -- strategy hooks --------------------------------------------------------------------

    def attach(self, database: TenantDatabase) -> None:
        engine = database.engine.sync_engine
        if not event.contains(engine, "before_cursor_execute", self._guard_cursor):
            event.listen(engine, "before_cursor_execute", self._guard_cursor)
            event.listen(engine.pool, "checkin", _forget_session)

    def configure_session(self, session: Session, tenant: Tenant) -> None:
        session.info[CRITERIA_KEY] = self._criteria
        session.info[_SCOPING_KEY] = self

    async def validate(self, database: TenantDatabase) -> None:
        findings = self.check()
        if findings:
            raise IsolationConfigError(
                "query scoping would not hold: " + "; ".join(str(f) for f in findings),
                hint=findings[0].fix,
            )

    def check(self) -> list[Finding]:
        """Every configuration finding; reads no database."""
        findings: list[Finding] = []
        tables = self._tables()
        for name, table in tables.items():
            tenant = self.tenant_column in table.c
            declared = name in self.shared_tables or table.name in self.shared_tables
            if tenant and declared:
                findings.append(
                    Finding(
                        "Q002",
                        name,
                        "declared shared but has the tenant column",
                        "remove it from shared_tables (or drop the column)",
                    )
                )
            elif not tenant and not declared:
                findings.append(
                    Finding(
                        "Q001",
                        name,
                        "table has no tenant column and is not declared shared",
                        f"add a {self.tenant_column} column, or list it in shared_tables",
                    )
                )
            elif tenant and table.c[self.tenant_column].nullable:
                findings.append(
                    Finding(
                        "Q004",
                        name,
                        "the tenant column is nullable",
                        f"declare {self.tenant_column} NOT NULL",
                    )
                )
        names = set(tables) | {t.name for t in tables.values()}
        for name in sorted(self.shared_tables - names):
            findings.append(
                Finding(
                    "Q003",
                    name,
                    "listed in shared_tables but not in the metadata",
                    "fix the name, or add the table to the metadata",
                )
            )
        return findings

    # -- the engine guard ------------------------------------------------------------------

    def _guard_cursor(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        """Inside a tenant scope (or a bound transaction), refuse SQL no session approved."""
        if (
            current_tenant_or_none() is None
            and not in_central_scope()
            and conn.info.get(BOUND_KEY) is None
        ):
            return  # start-up, migrations, scripts: no tenant anywhere
        options = context.execution_options if context is not None else {}
        if options.get(_APPROVED) is _TOKEN or options.get(ALLOW_UNSCOPED):
            return
        compiled = getattr(context, "compiled", None)
        shape = _shape(compiled.statement if compiled is not None else statement)
        # The unit of work writes tenant tables with Core statements of its own; its rows were
        # stamped and checked in before_flush. Raw SQL stays refused during a flush too.
        ref = conn.info.get(_SESSION_KEY)
        session = ref() if ref is not None else None
        flushing = session is not None and bool(getattr(session, "_flushing", False))
        self._refuse_unconfined(shape, orm=flushing, trust_raw=flushing)


@event.listens_for(TenantBoundSession, "after_begin")
def _remember_session(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    if session.info.get(_SCOPING_KEY) is not None:
        connection.info[_SESSION_KEY] = weakref.ref(session)


def _forget_session(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info.pop(_SESSION_KEY, None)
