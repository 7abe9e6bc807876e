"""The engine's rule for QueryScoping: what a tenant's connection may send, read from the
statement itself, whichever API built it.

The check sits in the dialect's ``do_execute`` events (``hooks.py``) because they are what
every SQLAlchemy path to the driver dispatches, after every ``before_cursor_execute`` listener
(SQLAlchemy 2.1, ``engine/base.py``): ``Connection.execute``, ``exec_driver_sql`` and the
column defaults run before an INSERT (both skip the rewrite below), each batch of an
"insertmanyvalues" INSERT, the unit of work, and the legacy bulk methods.
``bulk_save_objects``, ``bulk_insert_mappings`` and ``bulk_update_mappings`` call
``persistence._emit_insert_statements`` and ``_emit_update_statements``, which hand Core
statements to ``Connection.execute``: they skip ``do_orm_execute`` and ``before_flush``,
``orm/bulk_persistence.py`` dispatches no mapper event (``before_insert``/``before_update``
fire for the unit of work only), and they set ``Session._flushing``, so no flag tells them from
a flush. ``do_orm_execute`` sees ``Session.execute`` only, ``before_flush`` a flush only,
``before_compile`` the legacy ``Query``. Only the driver's own connection
(``driver_connection.cursor()``) goes around the engine.

So nothing is trusted for who sent it. A statement is sent when ``do_orm_execute`` scoped it
(an execution option only that listener sets, to a private object), when it names no tenant
table, or when it confines itself, read from the compiled statement and its parameters: an
INSERT, UPDATE or DELETE of one tenant table that names no other tenant table, with
``tenant = :value`` ANDed at the top of its WHERE (UPDATE, DELETE), every row (INSERT) and every
SET of the tenant column holding this tenant. Anything else is refused before it is sent.

The rewrite (a convenience only: the driver's own connection skips it) runs where a
``before_execute`` listener would, in the engine's ``Connection`` class (``hooks.py``), and puts
the writes a tenant session's connection receives into that form: it ANDs the predicate into
UPDATE and DELETE, and stamps INSERT rows that do not name the tenant. What it leaves as it
was is decided by the check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, bindparam
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
)
from sqlalchemy.sql.lambdas import LambdaElement

from ..._options import ALLOW_UNSCOPED
from ...context import current_tenant_or_none, in_central_scope
from ...errors import TenantContextError, UnsafeQuery
from .shape import cached_shape, resolved

if TYPE_CHECKING:
    from .strategy import QueryScoping

__all__ = ["APPROVED", "PREDICATE_KEY", "TOKEN", "ScopingGate", "refuse_upsert"]

APPROVED = "asgi_tenancy_scoped"  # execution option set by the session hook, value TOKEN
TOKEN = object()
PREDICATE_KEY = "asgi_tenancy_tenant"  # the bound parameter of the predicate the gate adds
_MISSING = object()


def refuse_upsert(statement: Any) -> None:
    """Refuse ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE on a tenant table."""
    upsert = getattr(statement, "_post_values_clause", None)
    if upsert is not None and type(upsert).__name__ != "OnConflictDoNothing":
        # The row it updates is found by a unique key, not by the tenant, and its SET clause
        # is not checked.
        raise TenantContextError("an upsert that updates is refused on a tenant table")


class ScopingGate:
    """QueryScoping's ``StatementGuard``: scopes the Core writes it can, refuses the rest."""

    __slots__ = ("_strategy",)

    def __init__(self, strategy: QueryScoping) -> None:
        self._strategy = strategy

    def _target(self, statement: UpdateBase) -> Table | None:
        """The tenant table ``statement`` writes, if it writes one plain table."""
        table = self._strategy.metadata.tables.get(getattr(statement.table, "fullname", ""))
        if table is None or self._strategy.tenant_column not in table.c:
            return None
        return table

    # -- before compilation: put Core writes into a form that confines itself --------------

    def scope(
        self,
        statement: Any,
        multiparams: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        *,
        bound: str | None,
    ) -> tuple[Any, Sequence[Mapping[str, Any]], Mapping[str, Any]]:
        unchanged = statement, multiparams, params
        if bound is None or not isinstance(statement, (UpdateBase, LambdaElement)):
            return unchanged
        if options.get(APPROVED) is TOKEN or options.get(ALLOW_UNSCOPED):
            return unchanged
        statement = resolved(statement)
        if not isinstance(statement, UpdateBase) or self._target(statement) is None:
            return unchanged
        column = statement.table.c[self._strategy.tenant_column]
        if isinstance(statement, (Update, Delete)):
            scoped = statement.where(column == bindparam(PREDICATE_KEY, bound, type_=column.type))
            return scoped, multiparams, params
        if not isinstance(statement, Insert):
            return unchanged
        if statement.select is not None or statement._multi_values:
            _verify_insert(statement, column, (), bound)  # refused before it is compiled
            return unchanged
        rows = list(multiparams) or [params]
        key = column.key
        if any(_is_column(k, column) for k in statement._values or ()) or all(
            key in row for row in rows
        ):
            return unchanged  # nothing to stamp: the check decides
        stamped = [row if key in row else {**row, key: bound} for row in rows]
        if multiparams:
            return statement, stamped, {}
        return statement, [], stamped[0]

    # -- do_execute: the check ----------------------------------------------------------------

    def check(self, statement: str, context: Any, *, bound: str | None) -> None:
        """Inside a tenant scope (or a bound transaction), refuse SQL that is not scoped."""
        if current_tenant_or_none() is None and not in_central_scope() and bound is None:
            return  # start-up, migrations, scripts: no tenant anywhere
        options = context.execution_options if context is not None else {}
        if options.get(APPROVED) is TOKEN or options.get(ALLOW_UNSCOPED):
            return
        compiled = getattr(context, "compiled", None)
        if compiled is None:
            raise self._strategy.raw_sql()  # exec_driver_sql
        shape = cached_shape(compiled.statement)
        self._strategy.refuse_unreadable(shape)
        named = shape.tables | shape.beside
        tenant = {name for name in named if self._strategy.is_tenant_table(name)}
        if not tenant:
            return  # shared tables only
        if bound is not None and shape.target in tenant and not shape.beside & tenant:
            written = resolved(compiled.statement)
            self._verify_write(written, context.compiled_parameters or [{}], bound)
            return
        raise UnsafeQuery(
            "core_statement",
            "a Core statement or raw table on a tenant table is refused in a tenant scope",
            hint="query the mapped class instead of its Table",
        )

    def _verify_write(self, statement: Any, rows: Sequence[Mapping[str, Any]], bound: str) -> None:
        column = statement.table.c[self._strategy.tenant_column]
        if isinstance(statement, Insert):
            _verify_insert(statement, column, rows, bound)
            return
        keys = [p.key for p in _top_level_predicates(statement.whereclause, column)]
        if not any(all(row.get(k, _MISSING) == bound for row in rows) for k in keys):
            raise UnsafeQuery(
                "core_statement",
                "a write to a tenant table that does not confine itself is refused",
                hint="write it with the ORM, or on a tenant session's connection",
            )
        if not _named_by_column(statement, column) or any(
            row.get(column.key, bound) != bound for row in rows
        ):
            raise TenantContextError("the tenant of a row cannot be changed")


def _is_column(key: object, column: Any) -> bool:
    """Whether a key of ``values()`` (a name, a Column, an ORM attribute) is ``column``."""
    if isinstance(key, str):
        return bool(key == column.key)
    return bool(getattr(key, "key", None) == column.key and getattr(key, "table", None) is not None)


def _sent_as(value: object, column: Any, name: str) -> bool:
    """Whether ``value`` (a ``values()`` entry for ``column``) is sent as the parameter ``name``.

    SQLAlchemy names a literal's parameter after its column; a parameter the application
    named (``bindparam("x")``) keeps its own name, and an SQL expression is no parameter.
    """
    if not isinstance(value, BindParameter) or value.callable is not None:
        return False
    return bool(value.unique) or value.key == name


def _literal(value: object) -> bool:
    return not isinstance(value, ClauseElement) or (
        isinstance(value, BindParameter) and bool(value.unique) and value.callable is None
    )


def _named_by_column(statement: Any, column: Any) -> bool:
    """Whether the tenant column's ``values()`` entry, if any, is sent under its own name."""
    return all(
        _sent_as(value, column, column.key)
        for key, value in (getattr(statement, "_values", None) or {}).items()
        if _is_column(key, column)
    )


def _top_level_predicates(where: Any, column: Any) -> list[BindParameter[Any]]:
    """The parameters ``:p`` of every ``column = :p`` ANDed at the top of ``where``."""
    found: list[BindParameter[Any]] = []
    todo = [where] if where is not None else []
    while todo:
        clause = todo.pop()
        if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
            todo.extend(clause.clauses)
        elif (
            isinstance(clause, BinaryExpression)
            and clause.operator is operators.eq
            and isinstance(clause.right, BindParameter)
            and not clause.right.unique  # an anonymous name is chosen at compile time
            and clause.right.callable is None
            and getattr(clause.left, "key", None) == column.key
            and getattr(getattr(clause.left, "table", None), "fullname", None)
            == column.table.fullname
        ):
            found.append(clause.right)
    return found


def _verify_insert(
    statement: Any, column: Any, rows: Sequence[Mapping[str, Any]], bound: str
) -> None:
    if statement.select is not None:
        raise TenantContextError(
            "INSERT ... SELECT into a tenant table is refused: its rows cannot be checked"
        )
    refuse_upsert(statement)
    if statement._multi_values:
        # Row n's literal is sent as "<column>_m<n>"; anything else cannot be read back.
        named = [
            isinstance(row, Mapping)
            and any(_is_column(k, column) and _literal(v) for k, v in row.items())
            for multi in statement._multi_values
            for row in multi
        ]
        names = [f"{column.key}_m{n}" for n in range(len(named))]
        if not all(named) or any(row.get(k, _MISSING) != bound for row in rows for k in names):
            raise TenantContextError(
                "multi-row VALUES into a tenant table must name this tenant in every row",
                hint="pass the rows as parameters: execute(insert(table), rows)",
            )
        return
    if not _named_by_column(statement, column) or any(
        row.get(column.key, _MISSING) != bound for row in rows
    ):
        raise TenantContextError("a new row names another tenant, or none")
