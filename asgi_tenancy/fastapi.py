"""FastAPI glue: ``current_tenant`` and ``tenant_session`` dependencies, and ``setup_tenancy``.

Needs the ``fastapi`` extra. The data layer is reached through the small ``TenantDatabaseLike``
protocol, which ``asgi_tenancy.sqlalchemy.TenantDatabase`` satisfies.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.websockets import WebSocket

from . import context
from ._asgi import (
    BEFORE_RESPONSE_KEY,
    MIDDLEWARE_SCOPE_KEY,
    PROBLEM_MEDIA_TYPE,
    WS_POLICY_VIOLATION,
    BodySizeLimit,
    BodyTooLarge,
    lifespan_went_through_middleware,
    problem,
    problem_response,
)
from .errors import (
    DatabaseUnavailable,
    IsolationConfigError,
    TenancyError,
    TenantCapacityExceeded,
    TenantOverShare,
)
from .middleware import TenancyMiddleware, _compile_exempt
from .resolvers import HeaderResolver, JWTClaimResolver
from .tenant import Tenant

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["TenantDatabaseLike", "current_tenant", "setup_tenancy", "tenant_session"]

_STATE_KEY = "tenancy_database"
_log = logging.getLogger("asgi_tenancy.fastapi")

# Stable codes for FastAPI's and Starlette's own HTTP errors (not the interpreter's phrases,
# which changed between Python versions); any other status is ``http_<status>``.
_HTTP_PROBLEMS = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("content_too_large", "Content too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    422: ("unprocessable_content", "Unprocessable content"),
    429: ("too_many_requests", "Too many requests"),
    500: ("internal_error", "Internal server error"),
    503: ("service_unavailable", "Service unavailable"),
}
_MAX_ERRORS = 20  # a 422 lists at most this many problems, each bounded: never an echo
_MAX_LOC_PART = 64
_MAX_MESSAGE = 200
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


@runtime_checkable
class TenantDatabaseLike(Protocol):
    """What the FastAPI glue needs from the data layer."""

    def session(self) -> AbstractAsyncContextManager[AsyncSession]: ...

    async def validate(self) -> None: ...

    async def dispose(self) -> None: ...


def current_tenant(connection: HTTPConnection) -> Tenant:
    """Dependency: the request's tenant; outside a tenant scope (an exempt route) it is a 400."""
    return _tenant_of(connection)


async def tenant_session(connection: HTTPConnection) -> AsyncIterator[AsyncSession]:
    """Dependency: an ``AsyncSession`` bound to the request's tenant; closed after the response.

    Its connection is taken by its first statement, as SQLAlchemy does. A response that starts
    before the session holds one (a ``StreamingResponse``, whose body runs after the status)
    takes it first, with its bound ``BEGIN``: a full pool or a dead connection is then a
    problem response, never a 200 with a cut body.
    """
    database = getattr(connection.app.state, _STATE_KEY, None)
    if database is None:
        raise IsolationConfigError(
            "tenant_session needs a database", hint="call setup_tenancy(app, database=...)"
        )
    _tenant_of(connection)  # refuse before touching the data layer
    try:
        async with database.session() as session:
            hold = getattr(database, "hold_connection", None)
            before = connection.scope.get(BEFORE_RESPONSE_KEY)
            if hold is None:  # a stand-in data layer may have none
                yield session
            elif before is not None and connection.scope["type"] == "http":
                # Taken at the response's start, only if no statement took it by then: no
                # greenlet and no round trip of its own on the common path.
                hook = functools.partial(_hold_before_response, hold, session, before)
                _route_task.set(before)  # what the endpoint's own tasks see (contextvars)
                before.append(hook)
                try:
                    yield session
                finally:  # a response that starts later (an error's) must not take one
                    if hook in before:
                        before.remove(hook)
            else:  # a websocket (held from the accept on) or no middleware hook
                await _hold(hold, session)
                yield session
    except TenancyError as exc:
        # Logged here, once: after the first byte (a stream) no handler sees it any more.
        _log_failure(exc)
        raise


async def _hold(hold: Callable[[AsyncSession], Awaitable[None]], session: AsyncSession) -> None:
    try:
        await hold(session)
    except DatabaseUnavailable:
        if session.sync_session.identity_map or session.new or session.deleted:
            raise  # what the endpoint loaded or added would be lost with the session
        # A pooled connection that died while idle, and nothing in the session yet: one more
        # try on a fresh connection (bound like any) is safe.
        await session.invalidate()
        await hold(session)


async def _hold_before_response(
    hold: Callable[[AsyncSession], Awaitable[None]], session: AsyncSession, request: object
) -> None:
    if _route_task.get() is not request:
        # The status is sent from a task that is not the endpoint's (a BaseHTTPMiddleware
        # between: it runs the endpoint and its body in a task of its own), so the body may
        # be using the session right now, and one AsyncSession is not for two tasks. The
        # body's first statement takes the connection instead.
        return
    try:
        await _hold(hold, session)
    except TenancyError as exc:
        _log_failure(exc)  # the middleware answers it; nothing else sees it
        raise


# The request (its before-response list) whose endpoint runs in this task or its children.
_route_task: ContextVar[object] = ContextVar("asgi_tenancy_route_task", default=None)

_LOGGED = "_asgi_tenancy_logged"


def _log_failure(exc: TenancyError) -> None:
    """Log a server-side failure once, with its cause (the handler skips what was logged)."""
    if isinstance(exc, TenantOverShare):
        # A decision, not a fault: a flooding tenant must not flood the log with tracebacks.
        _log.info("a tenant over its fair share answered 503")
        return
    if exc.status_code >= 500 and not getattr(exc, _LOGGED, False):
        _log.error("tenancy error answered with %s", exc.status_code, exc_info=exc)
        setattr(exc, _LOGGED, True)


def setup_tenancy(
    app: FastAPI,
    *,
    database: TenantDatabaseLike | None = None,
    tenant_header: str | None = "x-tenant-id",
    problem_details: bool = False,
    max_body_size: int | None = None,
) -> None:
    """Install problem+json handlers for every ``TenancyError`` and wire ``database`` in.

    At start-up the app refuses to serve without ``TenancyMiddleware`` or when ``database``
    fails validation; it is disposed at shutdown. ``problem_details=True`` answers FastAPI's own
    errors (404, 405, 422, ``HTTPException``, an unhandled 500) as problem+json too, and
    ``max_body_size`` refuses larger request bodies with a 413. The OpenAPI schema documents the
    tenant header and bearer token as security schemes and the problem responses
    (``tenant_header`` names the header when the middleware is not found; ``None`` leaves the
    schema alone).
    """
    if database is not None and not isinstance(database, TenantDatabaseLike):
        raise IsolationConfigError("database needs session(), validate() and dispose()")
    # One handler for http (a problem response) and websockets (a 1008 close).
    app.add_exception_handler(TenancyError, _handle_tenancy_error)  # type: ignore[arg-type]
    setattr(app.state, _STATE_KEY, database)
    app.router.lifespan_context = _with_checks(app.router.lifespan_context, database)
    if database is not None:
        # A tenant whose pool is exhausted gets the documented 503, not a 500.
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        app.add_exception_handler(PoolTimeout, _handle_pool_timeout)  # type: ignore[arg-type]
    if max_body_size is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_body_size)
        app.add_exception_handler(BodyTooLarge, _handle_http_exception)  # type: ignore[arg-type]
    if problem_details:
        app.add_exception_handler(HTTPException, _handle_http_exception)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, _handle_validation_error)
        app.add_exception_handler(Exception, _handle_unexpected)
    if tenant_header is not None:
        app.openapi = _openapi_with_tenancy(  # type: ignore[method-assign]
            app,
            app.openapi,
            _OpenApiOptions(
                tenant_header.lower(),
                problem_details,
                max_body_size is not None,
                database is not None,
            ),
        )


def _tenant_of(connection: HTTPConnection) -> Tenant:
    tenant = context.current_tenant_or_none()
    if tenant is not None:
        return tenant
    if not connection.scope.get(MIDDLEWARE_SCOPE_KEY):
        # Not the client's fault: the server would refuse every request.
        raise IsolationConfigError(
            "no TenancyMiddleware saw this request",
            hint="app.add_middleware(TenancyMiddleware, resolvers=[...], store=...)",
        )
    return context.current_tenant()  # raises TenantContextError: an exempt path, say


def _middleware_of(app: FastAPI) -> Middleware | None:
    for middleware in app.user_middleware:
        cls = middleware.cls
        if isinstance(cls, type) and issubclass(cls, TenancyMiddleware):
            return middleware
    return None


def _with_checks(
    inner: Callable[[Any], AbstractAsyncContextManager[Any]], database: TenantDatabaseLike | None
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        # Added with add_middleware, or wrapped around the app by hand (then the lifespan
        # passed through it): either way the middleware is there.
        if not lifespan_went_through_middleware() and (
            not isinstance(app, FastAPI) or _middleware_of(app) is None
        ):
            raise IsolationConfigError(
                "setup_tenancy found no TenancyMiddleware: no request could name its tenant",
                hint="app.add_middleware(TenancyMiddleware, resolvers=[...], store=...)",
            )
        if database is None:
            async with inner(app) as state:
                yield state
            return
        await _validate(database, _store_of(app))  # refuse to serve when isolation would not hold
        try:
            async with inner(app) as state:
                yield state
        finally:
            await database.dispose()

    return lifespan


def _store_of(app: Any) -> Any:
    """The middleware's store, unwrapped from its cache (``None`` when not found)."""
    middleware = _middleware_of(app) if isinstance(app, FastAPI) else None
    store = None if middleware is None else middleware.kwargs.get("store")
    return getattr(store, "store", store)


async def _validate(database: TenantDatabaseLike, store: Any) -> None:
    """``validate()``, and the store's own check (a registry the app role cannot read, T001);
    every finding is logged on a line of its own, with its code, before the start is refused."""
    findings: list[Any] = []
    try:
        await database.validate()
    except IsolationConfigError as exc:
        if not exc.findings:
            raise
        findings += exc.findings
    check = getattr(store, "check", None)
    if callable(check):
        findings += await check()
    if not findings:
        return
    for finding in findings:
        _log.error("start-up check failed: %s", finding)
    count = len(findings)
    raise IsolationConfigError(
        f"isolation would not hold: {count} finding{'s' * (count != 1)}", findings=findings
    )


# -- exception handlers ----------------------------------------------------------------------


async def _handle_tenancy_error(connection: Request | WebSocket, exc: Exception) -> Response | None:
    assert isinstance(exc, TenancyError)
    _log_failure(exc)
    if isinstance(connection, WebSocket):
        await connection.close(code=WS_POLICY_VIOLATION, reason=exc.code)
        return None
    return problem_response(exc)


async def _handle_pool_timeout(connection: Request | WebSocket, exc: Exception) -> Response | None:
    capacity = TenantCapacityExceeded("every database connection of this tenant is in use")
    capacity.__cause__ = exc
    return await _handle_tenancy_error(connection, capacity)


async def _handle_http_exception(
    connection: Request | WebSocket, exc: Exception
) -> Response | None:
    assert isinstance(exc, HTTPException)
    if isinstance(connection, WebSocket):
        await connection.close(code=WS_POLICY_VIOLATION)
        return None
    status = exc.status_code
    headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
    if status == 405:
        # Starlette lists only the methods of the first route that matched the path.
        headers["allow"] = _allowed_methods(connection)
    if status < 200 or status in (204, 304):
        return Response(status_code=status, headers=headers)  # no body allowed
    code, title = _HTTP_PROBLEMS.get(status, (f"http_{status}", "HTTP error"))
    extra: dict[str, Any] = {}
    raw: Any = exc.detail  # FastAPI's HTTPException takes any JSON value
    detail = raw if isinstance(raw, str) else title
    if not isinstance(raw, str) and raw is not None:
        extra["data"] = raw
    if status >= 500:
        detail, extra = title, {}  # as for the library's own: the cause is for the log
    return problem(status, code, title, detail, headers=headers, **extra)


async def _handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    listed = [_public_error(error) for error in list(errors)[:_MAX_ERRORS]]
    count = len(errors)
    detail = f"{count} problem{'s' if count != 1 else ''} with the request"
    return problem(422, "request_validation", "Request validation failed", detail, errors=listed)


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette logs and re-raises after this answer; the client learns nothing of the cause.
    return problem(500, "internal_error", "Internal server error", "Internal server error")


def _public_error(error: Any) -> dict[str, Any]:
    # Never the input (a 10 MB body would come back in full), nor ``ctx`` or ``url``.
    loc = [
        part if isinstance(part, int) else str(part)[:_MAX_LOC_PART]
        for part in list(error.get("loc", ()))[:8]
    ]
    return {
        "loc": loc,
        "type": str(error.get("type", ""))[:_MAX_LOC_PART],
        "msg": str(error.get("msg", ""))[:_MAX_MESSAGE],
    }


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


# -- OpenAPI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpenApiOptions:
    header: str  # documented when the middleware's own resolvers cannot be read
    problem_details: bool
    body_limit: bool
    database: bool  # its failures: a statement or lock timeout is a 504


_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem; `code` is stable, `detail` never echoes a tenant id.",
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string"},
        "detail": {"type": "string"},
        "reason": {"type": "string", "description": "unsafe_query only: what was refused"},
    },
}
_VALIDATION_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "ValidationProblem",
    "description": "A 422 problem: where and why, never the input itself.",
    "allOf": [
        {"$ref": "#/components/schemas/Problem"},
        {
            "type": "object",
            "required": ["errors"],
            "properties": {
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["loc", "type", "msg"],
                        "properties": {
                            "loc": {
                                "type": "array",
                                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                            },
                            "type": {"type": "string"},
                            "msg": {"type": "string"},
                        },
                    },
                }
            },
        },
    ],
}
_VALIDATION_REF = {"$ref": "#/components/schemas/ValidationProblem"}
_TENANCY_RESPONSES = {
    400: "No tenant named, a malformed identifier, or conflicting ones (problem+json)",
    404: "Unknown tenant, suspended, or not a member: one answer (problem+json)",
    503: "The tenant cannot be served right now (problem+json)",
}


def _openapi_with_tenancy(
    app: FastAPI, build: Callable[[], dict[str, Any]], options: _OpenApiOptions
) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        _document_tenancy(schema, app, options)
        app.openapi_schema = schema
        return schema

    return openapi


def _document_tenancy(schema: dict[str, Any], app: FastAPI, options: _OpenApiOptions) -> None:
    middleware = _middleware_of(app)
    resolvers: list[Any] = []
    exempt = None
    if middleware is not None:
        raw_resolvers = middleware.kwargs.get("resolvers", ())
        if isinstance(raw_resolvers, list | tuple):
            resolvers = list(raw_resolvers)
        exempt = _compile_exempt(middleware.kwargs.get("exempt", ()))  # type: ignore[arg-type]
    if not resolvers:
        resolvers = [HeaderResolver(options.header)]
    schemes = _security_schemes(resolvers)
    components = schema.setdefault("components", {})
    if schemes:
        components.setdefault("securitySchemes", {}).update(schemes)
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = _PROBLEM_SCHEMA
    if options.problem_details:
        schemas["ValidationProblem"] = _VALIDATION_PROBLEM_SCHEMA
    bearer = any(isinstance(r, JWTClaimResolver) for r in resolvers)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _HTTP_METHODS or not isinstance(operation, dict):
                continue
            responses = operation.setdefault("responses", {})
            if options.body_limit and "requestBody" in operation:
                _add_problem(responses, 413, "The request body is over the size limit")
            if options.problem_details and "422" in responses:
                responses["422"]["content"] = {PROBLEM_MEDIA_TYPE: {"schema": _VALIDATION_REF}}
            if exempt is not None and exempt.match(path):
                continue  # no tenant here: no credentials, no tenancy refusals
            if schemes and "security" not in operation:
                operation["security"] = [{name: []} for name in schemes]
            for status, description in _TENANCY_RESPONSES.items():
                _add_problem(responses, status, description)
            if bearer:
                _add_problem(responses, 401, "The bearer token failed verification (problem+json)")
            if options.database:
                _add_problem(responses, 504, "A statement or lock timeout (problem+json)")


def _security_schemes(resolvers: Iterable[Any]) -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    for resolver in resolvers:
        if isinstance(resolver, HeaderResolver):
            name = f"TenantHeader_{len(schemes)}" if "TenantHeader" in schemes else "TenantHeader"
            scheme: Any = APIKeyHeader(
                name=resolver.header, description="The tenant this request acts for."
            )
        elif isinstance(resolver, JWTClaimResolver):
            name = "BearerToken"
            scheme = HTTPBearer(
                bearerFormat="JWT",
                description=f"A JWT whose {resolver.claim!r} claim names the tenant.",
            )
        else:
            continue  # host, path or custom resolvers: nothing a client sets as a credential
        schemes[name] = jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
    return schemes


def _add_problem(responses: dict[str, Any], status: int, description: str) -> None:
    response = responses.setdefault(str(status), {"description": description})
    content = response.setdefault("content", {})
    if content.get("application/json") == {"schema": {}}:
        del content["application/json"]  # FastAPI's placeholder where no model was given
    content.setdefault(PROBLEM_MEDIA_TYPE, {"schema": {"$ref": "#/components/schemas/Problem"}})
