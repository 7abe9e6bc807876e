"""ASGI helpers shared by the middleware, resolvers and FastAPI glue: one of each."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import InvalidToken, IsolationConfigError, TenancyError, UnsafeQuery

PROBLEM_MEDIA_TYPE = "application/problem+json"
WS_POLICY_VIOLATION = 1008
# Set on every http and websocket scope the middleware handled: an app can tell "no tenant
# because the path is exempt" from "no tenant because the middleware is missing".
MIDDLEWARE_SCOPE_KEY = "asgi_tenancy.middleware"
# On every http scope of a tenant request: a list of no-argument coroutine functions the
# middleware awaits, in order, before it forwards the response's start. A TenancyError one
# raises is answered as a problem response instead (its raiser logs what must be logged).
BEFORE_RESPONSE_KEY = "asgi_tenancy.before_response"
_DIGITS = re.compile(r"[0-9]+")

# True while a lifespan runs inside TenancyMiddleware: setup_tenancy's start-up check.
_lifespan_through_middleware: ContextVar[bool] = ContextVar(
    "asgi_tenancy_lifespan_through_middleware", default=False
)


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 ``application/problem+json`` response with a stable ``code``."""
    body = {
        "type": f"urn:asgi-tenancy:error:{code}",
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def problem_response(exc: TenancyError) -> JSONResponse:
    """The problem body of a library error: never a stack or an identifier."""
    status = exc.status_code
    # Server-side errors keep their detail (a configuration hint) for the log, not the client.
    detail = exc.title if status >= 500 else exc.message
    extra: dict[str, Any] = {}
    if isinstance(exc, UnsafeQuery):
        extra["reason"] = exc.reason  # stable: what was refused, for a person or a model retrying
    headers: dict[str, str] = {}
    if isinstance(exc, InvalidToken):
        headers["www-authenticate"] = 'Bearer error="invalid_token"'
    if exc.retry_after is not None:
        headers["retry-after"] = str(exc.retry_after)
    return problem(status, exc.code, exc.title, detail, headers=headers, **extra)


async def reject(scope: Scope, receive: Receive, send: Send, exc: TenancyError) -> None:
    """Answer a request the library refused: a problem response, or close a websocket (1008)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": exc.code})
        return
    await problem_response(exc)(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path below the mount point (``root_path``), as Starlette's router matches it."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :][:1] in ("/", ""):
        return path[len(root_path) :]
    return path


@contextmanager
def lifespan_through_middleware() -> Iterator[None]:
    """Mark the lifespan running in this context as passing through ``TenancyMiddleware``."""
    token = _lifespan_through_middleware.set(True)
    try:
        yield
    finally:
        _lifespan_through_middleware.reset(token)


def lifespan_went_through_middleware() -> bool:
    return _lifespan_through_middleware.get()


class BodyTooLarge(HTTPException):
    """A request body over the configured limit (an ``HTTPException``: FastAPI re-raises it)."""

    code = "content_too_large"
    title = "Content too large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(413, f"the request body is over {limit} bytes")

    def response(self) -> JSONResponse:
        return problem(413, self.code, self.title, str(self.detail))


class BodySizeLimit:
    """Refuse http request bodies over ``max_bytes`` with a 413 problem, before they are parsed.

    A declared ``Content-Length`` over the limit is refused before the app runs; a body
    streamed without one is counted as it is received, and refused at the first byte over.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise IsolationConfigError("max_body_size must be a number of bytes (an int >= 0)")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await BodyTooLarge(self.max_bytes).response()(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as exc:  # nobody downstream answered it
            if started:
                raise
            await exc.response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    if value is None or _DIGITS.fullmatch(value) is None:
        return None  # absent or malformed: counted as it arrives instead
    return int(value) if len(value) <= 18 else sys.maxsize  # no int() of a 10,000-digit value
