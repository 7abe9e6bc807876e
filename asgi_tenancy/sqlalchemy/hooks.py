"""Every listener asgi-tenancy installs on SQLAlchemy, in one place, each installed once.

On ``TenantBoundSession`` (once per process, by ``install``):

- ``after_begin``: every transaction (the first, and each one after a commit or a rollback)
  gets the session's binding; on asyncpg it travels inside the BEGIN message (no round trip
  of its own), on other drivers it is executed. The connection remembers which tenant it is
  bound to until it goes back to the pool.
- ``do_orm_execute``: the scope check, then the strategy's ORM criteria.
- ``before_flush``: the scope check, then stamping of new rows and refusal of foreign ones.
- ``before_attach``, ``loaded_as_persistent``, ``pending_to_persistent``: every object is
  stamped with the tenant that loaded or persisted it, and refused by any other tenant's
  session (under schema isolation two tenants' rows share primary keys).

On each engine ``TenantDatabase`` (or a strategy) serves, once per engine:

- the dialect's ``do_execute`` (and ``do_executemany``, ``do_execute_no_params``), right
  before the driver call of every statement: the tenant the connection's transaction was bound
  to must be the current scope (defence in depth); PostgreSQL's grammar decides whether the
  statement may leave session state (``hygiene.py``), and such a connection is marked; the
  strategy's own statement guard, if it has one; a streamed (server-side) result checks the
  scope on every fetch.
- a strategy whose guard rewrites statements (QueryScoping) gets the engine's ``Connection``
  class, whose ``_execute_clauseelement`` calls ``guard.scope`` first (no engine event).
- pool ``checkout``: a marked connection is replaced, never reused, and so is one the server
  closed while it was idle (asyncpg: ``TenancyConnection.closed_by_server``); ``checkin``: the
  binding is forgotten; ``connect``: the strategy's once-per-connection SQL (the signing session).
  ``do_connect`` (asyncpg): the connection class that carries the binding.

When a connection goes from one tenant to another, the first transaction of the new tenant
also releases every session advisory lock and, if sequence values were drawn, discards the
session's sequence state (``currval``/``lastval``), in the same ``BEGIN`` message.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.engine.cursor import _DEFAULT_FETCH, BufferedRowCursorFetchStrategy
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.pool import ConnectionPoolEntry

from .._options import OWN_STATEMENT
from ..errors import IsolationConfigError
from .hygiene import Effect, Hygiene
from .session import OWNER_KEY, TenantBoundSession, check_owner, check_scope
from .strategy import StatementGuard

__all__ = [
    "ConnectionState",
    "check_first",
    "connection_state",
    "hygiene_of",
    "install",
    "own_statement",
]

_STATE_KEY = "asgi_tenancy"  # the one key asgi-tenancy keeps in a connection's info
#: Execution options of the library's own statements (bindings, the backend pid query).
own_statement: Mapping[str, Any] = MappingProxyType({OWN_STATEMENT: True})


_UNBOUND = "\x00unbound"  # ``used_by`` after a statement outside any tenant's transaction
_UNLOCK = "pg_catalog.pg_advisory_unlock_all()"
_RESET_LOCKS = f"SELECT {_UNLOCK}"
_RESET_SEQUENCES = "DISCARD SEQUENCES"


@dataclass(slots=True)
class ConnectionState:
    """What asgi-tenancy knows of one pooled connection; lives in its ``info``."""

    bound: str | None = None  # tenant id of the open bound transaction
    dirty: bool = False  # a statement may have changed session state: replace at checkout
    hygiene: Hygiene | None = None  # its engine's statement judge (PostgreSQL): reset on a
    # change of tenant (sequence state; session advisory locks, where the role may take them)
    used_by: str | None = None  # who used the session last: a tenant id, or _UNBOUND
    sequences: bool = False  # sequence values drawn since the last reset
    session_key: str | None = None  # the strategy's per-connection key (signing session)
    counter: int = 0  # bindings the server received (the signed binding's counter)

    def sent(self) -> None:
        """The binding made for ``counter + 1`` reached the server with its BEGIN."""
        self.counter += 1


def connection_state(info: dict[Any, Any]) -> ConnectionState:
    state: ConnectionState | None = info.get(_STATE_KEY)
    if state is None:
        state = info[_STATE_KEY] = ConnectionState()
    return state


# -- the session -------------------------------------------------------------------------------


def _bind_transaction(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    assert isinstance(session, TenantBoundSession)
    tenant_id = session.tenant.id
    check_scope(tenant_id)
    if transaction.nested:
        return  # a SAVEPOINT: the transaction around it is bound already
    state = connection_state(connection.info)
    state.bound = tenant_id
    statements: list[str] = []
    hygiene = state.hygiene
    changed = hygiene is not None and state.used_by is not None and state.used_by != tenant_id
    if changed and state.sequences:
        statements.append(_RESET_SEQUENCES)
        state.sequences = False
    unlock = changed and hygiene is not None and hygiene.session_locks
    state.used_by = tenant_id
    binding = session.binding
    alone = None
    if binding is not None:
        # Counted when the server has it: a signed binding's counter moves in step with the
        # server's, and a binding withdrawn unsent (a session that ran nothing) is not counted.
        counter = state.counter + 1
        # The unlock rides in the binding's own SELECT where it has one: a statement less.
        merged = binding.with_select(state.session_key, counter, _UNLOCK) if unlock else None
        if merged is None:
            if unlock:
                statements.append(_RESET_LOCKS)
            merged = binding.for_transaction(state.session_key, counter)
        statements.append(merged)
        alone = binding.alone
    elif unlock:
        statements.append(_RESET_LOCKS)
    if not statements and alone is None:
        return
    driver = connection.connection.driver_connection
    set_pending = getattr(driver, "set_pending_binding", None)
    if set_pending is not None:
        # Inside the BEGIN message (no round trip), and ``alone`` as one message of its own.
        set_pending(";".join(statements) or None, alone, state.sent)
    else:
        for statement in statements if alone is None else [*statements, alone]:
            connection.exec_driver_sql(statement, execution_options=own_statement)
        state.sent()


def _on_execute(orm_state: ORMExecuteState) -> None:
    session = orm_state.session
    assert isinstance(session, TenantBoundSession)
    session.check_scope()
    if session.criteria is not None:
        session.criteria.apply(orm_state, session.tenant.id)


def _on_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    assert isinstance(session, TenantBoundSession)
    session.check_scope()
    if session.criteria is not None:
        session.criteria.stamp(session, session.tenant.id)


def _on_attach(session: Session, instance: Any) -> None:
    assert isinstance(session, TenantBoundSession)
    session.check_scope()
    check_owner(session, instance)


def _stamp_owner(session: Session, instance: Any) -> None:
    assert isinstance(session, TenantBoundSession)
    instance_state(instance).info[OWNER_KEY] = session.tenant.id


_SESSION_HOOKS = (
    ("after_begin", _bind_transaction),
    ("do_orm_execute", _on_execute),
    ("before_flush", _on_flush),
    ("before_attach", _on_attach),
    ("loaded_as_persistent", _stamp_owner),
    ("pending_to_persistent", _stamp_owner),
)


def _install_session_hooks() -> None:
    for name, listener in _SESSION_HOOKS:
        if not event.contains(TenantBoundSession, name, listener):
            event.listen(TenantBoundSession, name, listener)


# -- the engine --------------------------------------------------------------------------------


class _ScopedRowFetch(BufferedRowCursorFetchStrategy):
    """The fetch strategy of a streamed result on a bound connection: every fetch checks."""

    __slots__ = ("_tenant_id",)

    def __init__(self, cursor: Any, options: Any, tenant_id: str) -> None:
        # Made before the statement runs: no first row fetched here (the buffer fills on the
        # first fetch, which checks the scope like every other).
        super().__init__(cursor, options, initial_buffer=collections.deque())
        self._tenant_id = tenant_id

    def fetchone(self, result: CursorResult[Any], cursor: Any, hard_close: bool = False) -> Any:
        check_scope(self._tenant_id)
        return super().fetchone(result, cursor, hard_close)

    def fetchmany(self, result: CursorResult[Any], cursor: Any, size: int | None = None) -> Any:
        check_scope(self._tenant_id)
        return super().fetchmany(result, cursor, size)

    def fetchall(self, result: CursorResult[Any], cursor: Any) -> Any:
        check_scope(self._tenant_id)
        return super().fetchall(result, cursor)


def _statement_hook(guard: StatementGuard | None, hygiene: Hygiene | None) -> Any:
    """The per-statement check, as the dialect's ``do_execute`` listener.

    A dialect event, not ``before_cursor_execute``: every path from a ``Connection`` to the
    driver (a single statement, each "insertmanyvalues" batch, the column defaults run before
    an INSERT) dispatches it right before the driver call, after every
    ``before_cursor_execute`` listener (so it judges the text as sent), and it lives on the
    engine's dialect, so a connection does not join an engine dispatcher per checkout (in
    SQLAlchemy 2.1 that joining cost more than the check itself).
    """

    def check(statement: str, context: Any) -> None:
        if context is None:  # no SQLAlchemy path sends one without (PostgreSQL, SQLite)
            raise IsolationConfigError("a statement without an execution context is refused")
        try:
            info = context.root_connection.info
        except NotImplementedError:
            # The dialect's first-connect initialisation (its own version and schema queries)
            # runs on a bare pool record before the connection is anyone's: nothing to check.
            return
        state = connection_state(info)
        bound = state.bound
        if bound is not None:
            check_scope(bound)
        else:
            state.used_by = _UNBOUND
        if context.execution_options.get(OWN_STATEMENT):
            return
        if hygiene is not None:
            state.hygiene = hygiene
            effect = hygiene.effect(statement)
            if effect & Effect.SESSION:
                state.dirty = True
            elif effect & Effect.SEQUENCES:
                state.sequences = True
        if guard is not None:
            guard.check(statement, context, bound=bound)
        if (
            bound is not None
            and context._is_server_side
            and context.cursor_fetch_strategy is _DEFAULT_FETCH
        ):
            # A streamed result: each fetch happens later, so each fetch checks the scope.
            context.cursor_fetch_strategy = _ScopedRowFetch(
                context.cursor, context.execution_options, bound
            )

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        check(statement, context)

    def do_execute_no_params(cursor: Any, statement: str, context: Any) -> None:
        check(statement, context)

    return {
        "do_execute": do_execute,
        "do_executemany": do_execute,
        "do_execute_no_params": do_execute_no_params,
    }


def _scoping_connection(guard: StatementGuard, base: type[Connection]) -> type[Connection]:
    """The engine's ``Connection`` class when its strategy rewrites statements (QueryScoping's
    Core writes): ``guard.scope`` runs where a ``before_execute`` listener would, before the
    statement is compiled. Not an engine event: one engine-level listener makes SQLAlchemy
    join an engine dispatcher to every connection and dispatch every engine event of every
    statement (about 100,000 instructions a request). What it does not rewrite, the statement
    check (``do_execute``) still judges."""

    class ScopingConnection(base):  # type: ignore[valid-type,misc]
        def _execute_clauseelement(
            self, elem: Any, distilled_parameters: Any, execution_options: Any
        ) -> Any:
            bound = connection_state(self.info).bound
            if bound is not None:
                options = elem._execution_options.merge_with(
                    self._execution_options, execution_options
                )
                single = len(distilled_parameters) == 1
                multiparams = () if single else distilled_parameters
                params = distilled_parameters[0] if single else {}
                elem, multiparams, params = guard.scope(
                    elem, multiparams, params, options, bound=bound
                )
                distilled_parameters = (
                    list(multiparams) if multiparams else [params] if params else []
                )
            return super()._execute_clauseelement(elem, distilled_parameters, execution_options)

    return ScopingConnection


def _replace_dirty(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
    state = connection_state(record.info)
    if state.dirty:
        state.dirty = False
        # The pool closes this connection and checks out a fresh one in its place.
        raise exc.DisconnectionError("connection may carry session state: replaced")
    closed = getattr(getattr(dbapi_connection, "driver_connection", None), "closed_by_server", None)
    if closed is not None and closed():
        # Ended by the server while idle: a fresh one now, not a failed first statement.
        raise exc.DisconnectionError("the server closed this idle connection: replaced")


def _forget_binding(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    state = connection_state(record.info)
    state.bound = None
    set_pending = getattr(
        getattr(dbapi_connection, "driver_connection", None), "set_pending_binding", None
    )
    if set_pending is not None:
        set_pending(None)


def _use_tenancy_connection(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    from ._asyncpg import TenancyConnection

    if cparams.get("connection_class") is None:
        cparams["connection_class"] = TenancyConnection
    # The application's own class: bindings fall back to one statement per transaction.


@dataclass(frozen=True, slots=True)
class _EngineHooks:
    guard: StatementGuard | None
    hygiene: Hygiene | None
    connect_sql: str | None
    statement_listeners: Mapping[str, Any]


_hooked: weakref.WeakKeyDictionary[Engine, _EngineHooks] = weakref.WeakKeyDictionary()


def _on_connect(connect_sql: str) -> Any:
    """The strategy's once-per-connection SQL; its one value is the connection's key."""

    def connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(connect_sql)
            row = cursor.fetchone()
        finally:
            cursor.close()
        dbapi_connection.commit()  # what it made outlives this first transaction
        state = connection_state(record.info)
        state.session_key = None if row is None else str(row[0])
        state.counter = 0  # a new session counts from its start (the signed binding's counter)

    return connect


def install(
    engine: AsyncEngine,
    guard: StatementGuard | None = None,
    *,
    hygiene: Hygiene | None = None,
    connect_sql: str | None = None,
) -> None:
    """Install the session hooks (once) and ``engine``'s hooks (once per engine).

    ``guard`` is the strategy's own statement check; one engine serves one strategy. On
    PostgreSQL every statement is judged by ``hygiene`` (a new one unless shared, e.g. by the
    engines of one ``DatabasePerTenant``); ``connect_sql`` runs once on each new connection.
    """
    _install_session_hooks()
    sync_engine = engine.sync_engine
    if sync_engine.dialect.name == "postgresql" and hygiene is None:
        hygiene = Hygiene()
    elif sync_engine.dialect.name != "postgresql":
        hygiene = None
    listeners = _statement_hook(guard, hygiene)
    hooks = _EngineHooks(guard, hygiene, connect_sql, listeners)
    existing = _hooked.get(sync_engine)
    if existing is not None:
        if existing.guard != guard or existing.connect_sql != connect_sql:
            raise IsolationConfigError(
                "this engine already serves another isolation strategy",
                hint="give each TenantDatabase an engine of its own",
            )
        return
    for name, listener in listeners.items():
        event.listen(sync_engine, name, listener)
    if guard is not None:
        sync_engine._connection_cls = _scoping_connection(guard, sync_engine._connection_cls)
    event.listen(sync_engine.pool, "checkin", _forget_binding)
    event.listen(sync_engine.pool, "checkout", _replace_dirty)
    if connect_sql is not None:
        event.listen(sync_engine.pool, "connect", _on_connect(connect_sql))
    if sync_engine.dialect.driver == "asyncpg":
        event.listen(sync_engine, "do_connect", _use_tenancy_connection)
    _hooked[sync_engine] = hooks
    check_first(engine)


def check_first(engine: AsyncEngine) -> None:
    """Refuse an engine on which another ``do_execute`` listener runs before the statement
    check: one that executes the statement itself and returns True ends the dispatch, so the
    check would never see it. SQLAlchemy calls class-level listeners first and ignores
    ``insert=True`` for dialect events, so the order is checked (at install and validation)
    rather than arranged."""
    hooks = _hooked.get(engine.sync_engine)
    if hooks is None:
        return
    dispatch = engine.sync_engine.dialect.dispatch
    for name, listener in hooks.statement_listeners.items():
        first = next(iter(getattr(dispatch, name)), None)
        if first is not listener:
            raise IsolationConfigError(
                f"another {name} listener runs before asgi-tenancy's statement check",
                hint=f"listen for {name} on the engine after creating the TenantDatabase, "
                "not on the dialect class; or use before_cursor_execute",
            )


def hygiene_of(engine: AsyncEngine) -> Hygiene | None:
    """The statement judge of an engine ``install`` has hooked (``None`` off PostgreSQL)."""
    hooks = _hooked.get(engine.sync_engine)
    return None if hooks is None else hooks.hygiene
