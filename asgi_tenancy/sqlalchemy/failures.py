"""The one place where database and driver errors become ``TenancyError``s.

``translate(exc)`` names what happened by SQLSTATE and driver condition (asyncpg's
``InterfaceError`` carries neither, so only there its message names the condition), and keeps
the driver's message out of the result (it may carry a host, a DSN or a row):

- a refused, lost or killed connection, a server shutting down, a driver left mid-operation
  (``cannot switch to state``, ``another operation is in progress``), a transaction whose
  connection was invalidated, a database that does not exist (any more):
  ``DatabaseUnavailable`` (503);
- a serialization failure or a deadlock (``40001``, ``40P01``), or a Citus shard split or moved
  under the statement (``XX000`` "could not find valid entry for shard"): ``DatabaseConflict``
  (503, retry);
- a statement or lock timeout (``57014``, ``55P03``): ``DatabaseTimeout`` (504);
- a pool that had no connection in time: ``TenantCapacityExceeded`` (503);
- a value the server (or the driver, before sending) refuses: ``InvalidValue`` (400).

Anything else is not translated (``None``): an application bug stays a 500 with its traceback.
``describe(exc)`` is the one-line, credential-free form for reports and logs.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from sqlalchemy import exc as sa_exc

from ..errors import (
    DatabaseConflict,
    DatabaseTimeout,
    DatabaseUnavailable,
    InvalidValue,
    TenancyError,
    TenantCapacityExceeded,
)

__all__ = ["TRANSLATABLE", "describe", "sqlstate", "translate", "translated", "translating"]

_CONFLICT = frozenset({"40001", "40P01"})
_TIMEOUT = frozenset({"57014", "55P03"})
# Class 08 (connection exception), the shutdown family of class 57, and a database that is gone
# (3D000 at connect: a tenant database dropped after its move, reached from a stale record).
_UNAVAILABLE = frozenset({"57P01", "57P02", "57P03", "53300", "3D000"})
# Values the request carried: out of range, malformed, too long, NUL or untranslatable text;
# 22000 is also what asyncpg answers when it cannot encode an argument (an int past int32).
_VALUE = frozenset(
    {"22000", "22001", "22003", "22007", "22008", "22021", "22023", "22P02", "22P05"}
)

# asyncpg's InterfaceError and InternalClientError carry no SQLSTATE; these conditions all mean
# the connection is unusable (closed under it, or left mid-operation by a lost server), so it is
# replaced.
_BROKEN_PROTOCOL = re.compile(
    r"closed|cannot switch to state|another operation is in progress|cannot call Transaction"
)
_PROTOCOL_ERRORS = frozenset({"InterfaceError", "InternalClientError"})
# Citus, when a shard was split or moved between a statement's planning and its execution
# (isolate_tenant_to_new_shard, citus_move_shard_placement): internal error XX000, retryable.
_SHARD_GONE = re.compile(r"could not find valid entry for shard \d+")
# SQLAlchemy's "Can't reconnect until invalid transaction is rolled back".
_INVALIDATED = "8s2b"

_DSN = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/@]*@", re.IGNORECASE)
_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """The error, then what it wraps: SQLAlchemy's ``orig``, the adapter's cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        inner = getattr(exc, "orig", None)
        exc = inner if isinstance(inner, BaseException) else exc.__cause__


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE the server answered with, wherever it sits in the chain."""
    for link in _chain(exc):
        state = getattr(link, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def _driver_condition(exc: BaseException) -> str | None:
    """``disconnect`` or ``value`` for the conditions drivers report without a SQLSTATE."""
    for link in _chain(exc):
        module = type(link).__module__
        name = type(link).__name__
        if isinstance(link, ConnectionError | TimeoutError) and not isinstance(
            link, sa_exc.TimeoutError
        ):
            return "disconnect"
        if module.startswith("asyncpg"):
            if name == "DataError":  # asyncpg refused to encode an argument (range, type)
                return "value"
            if name in ("ConnectionDoesNotExistError", "ConnectionFailureError"):
                return "disconnect"
            # InternalClientError: the protocol's own state check ("cannot switch to state
            # ..."), raised when a connection dies with an operation under way.
            if name in _PROTOCOL_ERRORS and _BROKEN_PROTOCOL.search(str(link)):
                return "disconnect"
        if isinstance(link, sa_exc.SQLAlchemyError) and link.code == _INVALIDATED:
            return "disconnect"  # the session kept using a transaction whose connection died
        if isinstance(link, OSError):
            return "disconnect"
    return None


def _server_message(exc: BaseException) -> str:
    """The server's own message: the link of the chain that carries the SQLSTATE."""
    for link in _chain(exc):
        if isinstance(getattr(link, "sqlstate", None), str):
            return str(link)
    return ""


def translate(exc: BaseException) -> TenancyError | None:
    """The ``TenancyError`` a database failure means, or ``None`` when it is not one."""
    if isinstance(exc, TenancyError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):  # the pool's, not the server's
        return TenantCapacityExceeded("every database connection of this tenant is in use")
    state = sqlstate(exc)
    if state is not None:
        if state in _CONFLICT:
            return DatabaseConflict("the transaction conflicted with another; retry it")
        if state in _TIMEOUT:
            return DatabaseTimeout("the database did not answer in time")
        if state in _UNAVAILABLE or state.startswith("08"):
            return DatabaseUnavailable("the database connection was lost")
        if state in _VALUE:
            return InvalidValue("the database refused a value of the request")
        if state == "XX000" and _SHARD_GONE.search(_server_message(exc)):
            return DatabaseConflict("the tenant's shard moved under the transaction; retry it")
        return None
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return DatabaseUnavailable("the database connection was lost")
    condition = _driver_condition(exc)
    if condition == "disconnect":
        return DatabaseUnavailable("the database cannot be reached")
    if condition == "value":
        return InvalidValue("a value of the request cannot be sent to the database")
    return None


#: What ``translate`` may know: everything else passes through untouched.
TRANSLATABLE = (sa_exc.SQLAlchemyError, OSError, TimeoutError)


@contextmanager
def translating() -> Iterator[None]:
    """Raise the translated ``TenancyError`` (the original as its cause) for what ``translate``
    knows; let everything else through untouched."""
    try:
        yield
    except TRANSLATABLE as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """``translating()`` for ``async with`` blocks."""
    with translating():
        yield


def describe(exc: BaseException) -> str:
    """One line for a report: the condition's kind and message, credentials removed."""
    source = exc
    inner = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
    if isinstance(inner, BaseException):
        # The adapter wraps asyncpg's own error, whose class names the condition.
        source = inner.__cause__ if isinstance(inner.__cause__, Exception) else inner
    text = str(source).strip()
    message = text.splitlines()[0] if text else ""
    state = getattr(source, "sqlstate", None)
    if isinstance(state, str):
        message = f"[{state}] {message}"
    message = _BACKGROUND.sub("", _DSN.sub(r"\1***@", message))
    if not message and source.__traceback__ is not None:
        # An empty assertion says nothing; where it was raised does (e.g. autocommit_block).
        frame = traceback.extract_tb(source.__traceback__)[-1]
        message = f"raised in {frame.name}() ({Path(frame.filename).name}:{frame.lineno})"
    return f"{type(source).__name__}: {message}"[:500]
