"""ASGI helpers shared by the middleware, resolvers and FastAPI glue: one of each."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .errors import InvalidToken, TenancyError, TenantMigrating, UnsafeQuery

PROBLEM_MEDIA_TYPE = "application/problem+json"
WS_POLICY_VIOLATION = 1008


def problem_response(exc: TenancyError) -> JSONResponse:
    """An RFC 9457 body: type, title, status, code, detail; never a stack or an identifier."""
    status = exc.status_code
    # Server-side errors keep their detail (a configuration hint) for the log, not the client.
    detail = exc.title if status >= 500 else exc.message
    body = {
        "type": f"urn:asgi-tenancy:error:{exc.code}",
        "title": exc.title,
        "status": status,
        "code": exc.code,
        "detail": detail,
    }
    if isinstance(exc, UnsafeQuery):
        body["reason"] = exc.reason  # stable: what was refused, for a person or a model retrying
    headers: dict[str, str] | None = None
    if isinstance(exc, InvalidToken):
        headers = {"www-authenticate": 'Bearer error="invalid_token"'}
    elif isinstance(exc, TenantMigrating):
        headers = {"retry-after": str(exc.retry_after)}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


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
