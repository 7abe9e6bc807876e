"""How a session's transactions get their tenant, and the checks that keep them on it.

- ``TenantBoundSession`` refuses every operation outside the scope of the tenant it was opened
  for, identity-map hits included, so a session can never serve another tenant's request.
- At the start of every transaction of such a session (the first, and each one after a commit or
  a rollback) ``after_begin`` hands the strategy's binding SQL to the connection: on asyncpg it
  travels inside the BEGIN message (no extra round trip); on other drivers it is executed.
- Every object a session loads or persists is stamped with the session's tenant; attaching it
  to (or merging it into) a session of another tenant raises, so an identity-map object of A can
  never be flushed into B's rows (under schema isolation their primary keys collide).
- Rows of a streamed result (a server-side cursor) are fetched from the server as they are read:
  each fetch checks the scope too, so a stream read after its scope ended raises.
- A per-statement guard compares the tenant the connection's transaction was bound to with the
  current scope, and refuses the statement when they differ (defence in depth).
- When a connection goes back to the pool, whatever binding it carried is forgotten. A
  connection on which a statement may have changed session state (``SET``, ``RESET``, ``DISCARD``,
  ``DO``, ``CALL``, ``set_config(``) is discarded at its next checkout instead of being reused:
  no round trip on the common path, and no session-level leftovers for the next tenant.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.engine.cursor import _DEFAULT_FETCH, BufferedRowCursorFetchStrategy
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.pool import ConnectionPoolEntry

from ..context import current_tenant_or_none
from ..errors import SessionTenantMismatch

__all__ = ["TenantBoundSession", "install_engine_hooks"]

TENANT_KEY = "asgi_tenancy.tenant"  # Session.info: id of the tenant the session belongs to
BINDING_KEY = "asgi_tenancy.binding"  # Session.info: SQL binding each transaction, or None
SIGNER_KEY = "asgi_tenancy.signer"  # Session.info: (backend pid) -> binding SQL, when signed
PID_KEY = "asgi_tenancy.pid"  # connection info: the server process id, fetched once
DIRTY_KEY = "asgi_tenancy.dirty"  # connection info: session state may have been changed
_BINDING_OPTION = "asgi_tenancy_binding"  # execution option marking the library's own binding

# Statements that may leave session-level state behind. Over-matching only costs a reconnect.
_SESSION_STATE = re.compile(
    r"^\s*(?:set|reset|discard|do|call|load|listen)\b|\bset_config\s*\(", re.IGNORECASE
)
BOUND_KEY = "asgi_tenancy.bound"  # connection info: tenant id of the open bound transaction
_hooked: weakref.WeakSet[Engine] = weakref.WeakSet()


def _check_scope(expected: str | None) -> None:
    current = current_tenant_or_none()
    if expected is None or current is None or current.id != expected:
        raise SessionTenantMismatch(
            "this session or connection belongs to another tenant scope, or its scope has ended"
        )


class TenantBoundSession(Session):
    """A Session tied to one tenant: outside that tenant's scope every operation raises."""

    def _tenancy_check(self) -> None:
        _check_scope(self.info.get(TENANT_KEY))

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._tenancy_check()
        return super().execute(*args, **kwargs)

    def scalars(self, *args: Any, **kwargs: Any) -> Any:
        self._tenancy_check()
        return super().scalars(*args, **kwargs)

    def scalar(self, *args: Any, **kwargs: Any) -> Any:
        self._tenancy_check()
        return super().scalar(*args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self._tenancy_check()
        return super().get(*args, **kwargs)

    def get_one(self, *args: Any, **kwargs: Any) -> Any:
        self._tenancy_check()
        return super().get_one(*args, **kwargs)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self._tenancy_check()
        super().add(*args, **kwargs)

    def add_all(self, *args: Any, **kwargs: Any) -> None:
        self._tenancy_check()
        super().add_all(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> None:
        self._tenancy_check()
        super().delete(*args, **kwargs)

    def merge(self, instance: Any, *args: Any, **kwargs: Any) -> Any:
        self._tenancy_check()
        _check_owner(self, instance)
        return super().merge(instance, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        self._tenancy_check()
        super().refresh(*args, **kwargs)

    def flush(self, *args: Any, **kwargs: Any) -> None:
        self._tenancy_check()
        super().flush(*args, **kwargs)

    def connection(self, *args: Any, **kwargs: Any) -> Connection:
        self._tenancy_check()
        return super().connection(*args, **kwargs)


def _check_owner(session: Session, instance: Any) -> None:
    owner = instance_state(instance).info.get(TENANT_KEY)
    if owner is not None and owner != session.info.get(TENANT_KEY):
        raise SessionTenantMismatch("this object was loaded for another tenant")


@event.listens_for(TenantBoundSession, "loaded_as_persistent")
@event.listens_for(TenantBoundSession, "pending_to_persistent")
def _stamp_owner(session: Session, instance: Any) -> None:
    instance_state(instance).info[TENANT_KEY] = session.info[TENANT_KEY]


event.listen(TenantBoundSession, "before_attach", _check_owner)


@event.listens_for(TenantBoundSession, "after_begin")
def _bind_transaction(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    tenant_id = session.info[TENANT_KEY]
    _check_scope(tenant_id)
    connection.info[BOUND_KEY] = tenant_id
    binding: str | None = session.info.get(BINDING_KEY)
    driver = connection.connection.driver_connection
    signer = session.info.get(SIGNER_KEY)
    if signer is not None:
        binding = signer(_backend_pid(connection, driver))
    if binding is None:
        return
    set_pending = getattr(driver, "set_pending_binding", None)
    if set_pending is not None:
        set_pending(binding)  # travels inside the BEGIN message: no round trip of its own
    else:
        connection.exec_driver_sql(binding, execution_options={_BINDING_OPTION: True})


def _backend_pid(connection: Connection, driver: Any) -> int:
    """The server process id: asyncpg knows it from the start-up message; others ask once."""
    get_pid = getattr(driver, "get_server_pid", None)
    if get_pid is not None:
        return int(get_pid())
    pid = connection.info.get(PID_KEY)
    if pid is None:
        pid = connection.info[PID_KEY] = int(
            connection.exec_driver_sql(
                "SELECT pg_backend_pid()", execution_options={_BINDING_OPTION: True}
            ).scalar_one()
        )
    return int(pid)


def _guard_statement(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    bound = conn.info.get(BOUND_KEY)
    if bound is not None:
        _check_scope(bound)
    if _SESSION_STATE.search(statement) and not (
        context is not None and context.execution_options.get(_BINDING_OPTION)
    ):
        conn.info[DIRTY_KEY] = True


class _ScopedRowFetch(BufferedRowCursorFetchStrategy):
    """The fetch strategy of a streamed result on a bound connection: every fetch checks."""

    __slots__ = ("_tenant_id",)

    def __init__(self, cursor: Any, options: Any, tenant_id: str) -> None:
        super().__init__(cursor, options)
        self._tenant_id = tenant_id

    def fetchone(self, result: CursorResult[Any], cursor: Any, hard_close: bool = False) -> Any:
        _check_scope(self._tenant_id)
        return super().fetchone(result, cursor, hard_close)

    def fetchmany(self, result: CursorResult[Any], cursor: Any, size: int | None = None) -> Any:
        _check_scope(self._tenant_id)
        return super().fetchmany(result, cursor, size)

    def fetchall(self, result: CursorResult[Any], cursor: Any) -> Any:
        _check_scope(self._tenant_id)
        return super().fetchall(result, cursor)


def _scope_streams(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    if context is None or not getattr(context, "_is_server_side", False):
        return  # buffered results: every row was fetched inside the scope
    bound = conn.info.get(BOUND_KEY)
    if bound is not None and context.cursor_fetch_strategy is _DEFAULT_FETCH:
        context.cursor_fetch_strategy = _ScopedRowFetch(cursor, context.execution_options, bound)


def _discard_dirty(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
    if record.info.pop(DIRTY_KEY, False):
        # The pool closes this connection and checks out a fresh one in its place.
        raise exc.DisconnectionError("connection may carry session state: replaced")


def _forget_binding(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info.pop(BOUND_KEY, None)
    set_pending = getattr(
        getattr(dbapi_connection, "driver_connection", None), "set_pending_binding", None
    )
    if set_pending is not None:
        set_pending(None)


def _use_tenancy_connection(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    from ._asyncpg import TenancyConnection

    current = cparams.get("connection_class")
    if current is None:
        cparams["connection_class"] = TenancyConnection
    elif not issubclass(current, TenancyConnection):
        # The application's own class: bindings fall back to one statement per transaction.
        return


def install_engine_hooks(engine: AsyncEngine) -> None:
    """Guard every statement of ``engine`` and clear bindings on check-in (idempotent)."""
    sync_engine = engine.sync_engine
    if sync_engine in _hooked:
        return
    event.listen(sync_engine, "before_cursor_execute", _guard_statement)
    event.listen(sync_engine, "after_cursor_execute", _scope_streams)
    event.listen(sync_engine.pool, "checkin", _forget_binding)
    event.listen(sync_engine.pool, "checkout", _discard_dirty)
    if sync_engine.dialect.driver == "asyncpg":
        event.listen(sync_engine, "do_connect", _use_tenancy_connection)
    _hooked.add(sync_engine)
