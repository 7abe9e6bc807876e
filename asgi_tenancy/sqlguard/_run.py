"""How ``SqlGuard.run`` executes a guarded query: the second wall, the caps, the clean-up.

One transaction (or a savepoint in the caller's), four round trips: a prelude that makes the
transaction READ ONLY, sets the timeout and ``standard_conforming_strings`` and switches to the
reader role, all transaction-local, and counts the session's advisory locks; the query, capped
in rows and bytes by the server; a check that it left no advisory lock (and a reseed of
``random()``, whose seed is the one session state a SELECT can change unseen); the rollback,
which undoes the rest. A connection left holding a lock is discarded, never reused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError

from .._options import ALLOW_UNSCOPED, OWN_STATEMENT
from ..errors import (
    GuardedQueryFailed,
    GuardedQueryTimeout,
    GuardedResultTooLarge,
    IsolationConfigError,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .guard import GuardedQuery

__all__ = ["execute", "load_columns"]

_CONFINED = {ALLOW_UNSCOPED: True}
_OWN = {ALLOW_UNSCOPED: True, OWN_STATEMENT: True}  # the guard's own prelude and clean-up
_MARK = "asgi-tenancy: the query result exceeds its byte cap"
_LOCKS = (
    "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks"
    " WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory')"
)
_PRELUDE = (
    "SELECT " + _LOCKS + " AS locks,"
    " pg_catalog.set_config('transaction_read_only', 'on', true),"
    " pg_catalog.set_config('statement_timeout', :tenancy_timeout, true),"
    " pg_catalog.set_config('standard_conforming_strings', 'on', true)"
    "{role}"
)
_ROLE = ", pg_catalog.set_config('role', :tenancy_role, true)"
# random()'s seed from a strong source: whatever the query did to it is gone
_AFTER = (
    "SELECT " + _LOCKS + " AS locks, pg_catalog.setseed(("
    "('x' || pg_catalog.substr(pg_catalog.md5(pg_catalog.gen_random_uuid()::text), 1, 8))"
    "::bit(32)::int4)::float8 / 2147483648.0)"
)
# Rows and bytes capped by the server while it produces them: once the running size of the
# rows' text passes max_bytes, a cast error carrying _MARK stops the statement. The check sits
# in ORDER BY (with row_number(), which keeps the query's own order), so it adds no column,
# and every row is measured before the first one is sent.
_WRAP = (
    "SELECT guarded_query.* FROM (SELECT * FROM (\n{sql}\n) AS guarded_query"
    " LIMIT :tenancy_max_rows) AS guarded_query WINDOW tenancy_w AS (ROWS UNBOUNDED PRECEDING)"
    " ORDER BY CASE WHEN pg_catalog.sum(pg_catalog.octet_length(guarded_query::text))"
    " OVER tenancy_w > :tenancy_max_bytes"
    " THEN ('" + _MARK + " ' || pg_catalog.count(*) OVER tenancy_w)::int4 END,"
    " pg_catalog.row_number() OVER tenancy_w"
)
_CATALOG = (
    "SELECT t.name, a.attname FROM unnest(CAST(:names AS text[]),"
    " CAST(:relations AS text[])) AS t(name, relation)"
    " JOIN pg_catalog.pg_attribute a ON a.attrelid = pg_catalog.to_regclass(t.relation)"
    " WHERE a.attnum > 0 AND NOT a.attisdropped ORDER BY t.name, a.attnum"
)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _server_error(exc: DBAPIError) -> tuple[str | None, str]:
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    cause = getattr(orig, "__cause__", None)
    message = getattr(cause, "message", None)
    if not isinstance(message, str):
        diag = getattr(orig, "diag", None)
        message = getattr(diag, "message_primary", None) or str(orig)
    return (str(sqlstate) if sqlstate else None), message


def _mapped(exc: DBAPIError, max_bytes: int, timeout_ms: int) -> Exception:
    sqlstate, message = _server_error(exc)
    if sqlstate == "57014":
        return GuardedQueryTimeout(f"the query ran longer than {timeout_ms} ms and was cancelled")
    if sqlstate == "22P02" and _MARK in message:
        return GuardedResultTooLarge(
            f"the result is larger than {max_bytes} bytes", sqlstate=sqlstate
        )
    if sqlstate is None or sqlstate[:2] in ("08", "53", "57", "58", "XX"):
        return exc  # the connection or the server, not the query: the caller's to handle
    return GuardedQueryFailed(f"{message} (SQLSTATE {sqlstate})", sqlstate=sqlstate)


async def load_columns(
    session: AsyncSession, schema: str | None, tables: Sequence[str]
) -> Mapping[str, tuple[str, ...]]:
    """The columns of ``tables`` as the session's catalog resolves them (read once per guard)."""
    relations = [_quote(t) if schema is None else f"{_quote(schema)}.{_quote(t)}" for t in tables]
    result = await session.execute(
        text(_CATALOG),
        {"names": list(tables), "relations": relations},
        execution_options=_CONFINED,
    )
    found: dict[str, list[str]] = {}
    for name, column in result.all():
        found.setdefault(name, []).append(column)
    return {name: tuple(cols) for name, cols in found.items()}


async def _discard(session: AsyncSession) -> None:
    connection = await session.connection()
    await connection.invalidate()


async def execute(
    session: AsyncSession,
    prepare: Callable[[], Awaitable[tuple[GuardedQuery, bool]]],
    *,
    role: str | None,
    max_rows: int,
    max_bytes: int,
    timeout_ms: int,
) -> Sequence[RowMapping]:
    """Run the query ``prepare`` gives, inside the walls this module describes."""
    nested = session.in_transaction()
    transaction = session.begin_nested() if nested else session.begin()
    failure: Exception | None = None
    async with transaction:
        query, filtered = await prepare()
        params: dict[str, Any] = {"tenancy_timeout": f"{timeout_ms}ms"}
        if role is not None:
            params["tenancy_role"] = role
        try:
            before = await session.scalar(
                text(_PRELUDE.format(role=_ROLE if role is not None else "")),
                params,
                execution_options=_OWN,
            )
        except DBAPIError as exc:
            if role is not None and _server_error(exc)[0] in ("42501", "22023", "42704"):
                raise IsolationConfigError(
                    f"run() cannot switch to the reader role {role!r}",
                    hint=f"CREATE ROLE {_quote(role)} NOLOGIN; GRANT {_quote(role)} TO "
                    "<app role> (docs/sqlguard.md#the-reader-role)",
                ) from exc
            raise
        wrapped = text(_WRAP.format(sql=query.sql))
        arguments = {
            **query.params,
            "tenancy_max_rows": max_rows,
            "tenancy_max_bytes": max_bytes,
        }
        try:
            result = await session.execute(
                wrapped, arguments, execution_options=_CONFINED if filtered else {}
            )
            rows = result.mappings().all()
        except DBAPIError as exc:
            failure = _mapped(exc, max_bytes, timeout_ms)
            await transaction.rollback()
        else:
            after = await session.scalar(text(_AFTER), execution_options=_OWN)
            if after != before:
                await _discard(session)
                raise GuardedQueryFailed(
                    "the query left session state behind; its connection was discarded"
                )
            await transaction.rollback()
            return rows
    # the query failed inside the transaction: look at the session once it is rolled back
    try:
        after = await session.scalar(text(_AFTER), execution_options=_OWN)
        if not nested:
            await session.rollback()
    except DBAPIError:
        after = None
    if after != before:
        await _discard(session)
    assert failure is not None
    raise failure
