"""FastAPI glue: ``current_tenant`` and ``tenant_session`` dependencies, and ``setup_tenancy``.

Needs the ``fastapi`` extra. The data layer is reached through the small ``TenantDatabaseLike``
protocol, which ``asgi_tenancy.sqlalchemy.TenantDatabase`` satisfies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fastapi import FastAPI
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from . import context
from ._asgi import WS_POLICY_VIOLATION, problem_response
from .errors import IsolationConfigError, TenancyError, TenantCapacityExceeded
from .tenant import Tenant

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["TenantDatabaseLike", "current_tenant", "setup_tenancy", "tenant_session"]

_STATE_KEY = "tenancy_database"
_log = logging.getLogger("asgi_tenancy.fastapi")


@runtime_checkable
class TenantDatabaseLike(Protocol):
    """What the FastAPI glue needs from the data layer."""

    def session(self) -> AbstractAsyncContextManager[AsyncSession]: ...

    async def validate(self) -> None: ...

    async def dispose(self) -> None: ...


def current_tenant() -> Tenant:
    """Dependency: the request's tenant; outside a tenant scope (an exempt route) it is a 400."""
    return context.current_tenant()


async def tenant_session(connection: HTTPConnection) -> AsyncIterator[AsyncSession]:
    """Dependency: an ``AsyncSession`` bound to the request's tenant, closed after the response."""
    database = getattr(connection.app.state, _STATE_KEY, None)
    if database is None:
        raise IsolationConfigError(
            "tenant_session needs a database", hint="call setup_tenancy(app, database=...)"
        )
    context.current_tenant()  # refuse before touching the data layer
    async with database.session() as session:
        yield session


def setup_tenancy(
    app: FastAPI,
    *,
    database: TenantDatabaseLike | None = None,
    tenant_header: str | None = "x-tenant-id",
) -> None:
    """Install problem+json handlers for every ``TenancyError`` and wire ``database`` in.

    The database is validated at start-up (the app refuses to start if isolation would not
    hold) and disposed at shutdown; ``tenant_header`` is documented in the OpenAPI schema.
    """
    if database is not None and not isinstance(database, TenantDatabaseLike):
        raise IsolationConfigError("database needs session(), validate() and dispose()")
    # One handler for http (a problem response) and websockets (a 1008 close).
    app.add_exception_handler(TenancyError, _handle_tenancy_error)  # type: ignore[arg-type]
    setattr(app.state, _STATE_KEY, database)
    if database is not None:
        app.router.lifespan_context = _with_database(app.router.lifespan_context, database)
        # A tenant whose pool is exhausted gets the documented 503, not a 500.
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        app.add_exception_handler(PoolTimeout, _handle_pool_timeout)  # type: ignore[arg-type]
    if tenant_header is not None:
        app.openapi = _openapi_with_header(app, app.openapi, tenant_header.lower())  # type: ignore[method-assign]


async def _handle_tenancy_error(connection: Request | WebSocket, exc: Exception) -> Response | None:
    assert isinstance(exc, TenancyError)
    if exc.status_code >= 500:
        _log.error("tenancy error answered with %s", exc.status_code, exc_info=exc)
    if isinstance(connection, WebSocket):
        await connection.close(code=WS_POLICY_VIOLATION, reason=exc.code)
        return None
    return problem_response(exc)


async def _handle_pool_timeout(connection: Request | WebSocket, exc: Exception) -> Response | None:
    capacity = TenantCapacityExceeded("every database connection of this tenant is in use")
    capacity.__cause__ = exc
    return await _handle_tenancy_error(connection, capacity)


def _with_database(
    inner: Callable[[Any], AbstractAsyncContextManager[Any]], database: TenantDatabaseLike
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        await database.validate()  # refuse to serve when isolation would not hold
        try:
            async with inner(app) as state:
                yield state
        finally:
            await database.dispose()

    return lifespan


def _openapi_with_header(
    app: FastAPI, build: Callable[[], dict[str, Any]], header: str
) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        parameter = {
            "name": header,
            "in": "header",
            "required": False,
            "description": "The tenant this request acts for (when the tenant is named by header).",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
        }
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                params = operation.setdefault("parameters", [])
                if not any(p.get("in") == "header" and p.get("name") == header for p in params):
                    params.append(dict(parameter))
        app.openapi_schema = schema
        return schema

    return openapi
