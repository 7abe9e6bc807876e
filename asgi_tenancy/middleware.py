"""``TenancyMiddleware``: resolve the tenant, load it, and run the application inside its scope."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._asgi import (
    BEFORE_RESPONSE_KEY,
    MIDDLEWARE_SCOPE_KEY,
    lifespan_through_middleware,
    reject,
    route_path,
)
from .context import enter_request, exit_request
from .errors import (
    IsolationConfigError,
    TenancyError,
    TenantContextError,
    TenantMigrating,
    TenantNotFound,
)
from .resolvers import ChainPolicy, Resolver, ResolverChain
from .store import MISS, CachedTenantStore, TenantStore, active_tenant, load_validated
from .tenant import Tenant

__all__ = ["Authorize", "TenancyMiddleware"]

Authorize: TypeAlias = Callable[[HTTPConnection, Tenant], bool | Awaitable[bool]]
#: Awaited before a tenant request's response starts (``BEFORE_RESPONSE_KEY``).
BeforeResponse: TypeAlias = Callable[[], Awaitable[None]]

_log = logging.getLogger("asgi_tenancy.middleware")
_EXEMPT_PATH = re.compile(r"(?:/[^/?#]+)+\Z")


class TenancyMiddleware:
    """Run each http and websocket request inside the scope of the tenant it names.

    ``resolvers`` name the tenant, ``store`` loads it, ``authorize`` (optional) checks that the
    caller may act for it; ``exempt`` paths (health checks, docs) run with no tenant at all.
    A request that names no tenant gets 400 (``TenantContextError``), never a default one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resolvers: Iterable[Resolver],
        store: TenantStore,
        exempt: Iterable[str] = (),
        authorize: Authorize | None = None,
        policy: ChainPolicy | str = ChainPolicy.ALL_AGREE,
    ) -> None:
        self.app = app
        self._chain = ResolverChain(resolvers, policy=policy)
        if not callable(getattr(store, "get", None)):
            raise IsolationConfigError("TenancyMiddleware needs a store", hint="a TenantStore")
        if authorize is not None and not callable(authorize):
            raise IsolationConfigError("authorize must be a callable (connection, tenant)")
        self._store = store
        self._cache = store if type(store) is CachedTenantStore else None
        self._authorize = authorize
        self._exempt = _compile_exempt(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            if scope["type"] == "lifespan":
                with lifespan_through_middleware():  # setup_tenancy's start-up check
                    await self.app(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        scope[MIDDLEWARE_SCOPE_KEY] = True  # "exempt", not "middleware forgotten"
        if self._exempt is not None and self._is_exempt(scope):
            await self._run(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        try:
            answer = self._chain.resolve_now(connection)  # validated there, once
            tenant_id = answer if answer is None or isinstance(answer, str) else await answer
            if tenant_id is None:
                raise TenantContextError("the request names no tenant")
            try:
                cache = self._cache
                cached = cache.peek(tenant_id) if cache is not None else MISS
                if cached is not MISS:  # a cache hit: no coroutine
                    tenant = active_tenant(cached)
                else:
                    tenant = await load_validated(self._store, tenant_id)
            except TenantMigrating as exc:
                # Only a member may learn that the tenant exists and is being migrated.
                if not isinstance(exc.tenant, Tenant):
                    raise TenantNotFound() from None
                await self._check_member(connection, exc.tenant)
                raise
            if self._authorize is not None:
                await self._check_member(connection, tenant)
            if self._chain.rewrites_scope:
                scope = self._chain.route_scope(scope, tenant.id)
        except TenancyError as exc:
            if exc.status_code >= 500:  # the client sees a bare title; operators need the cause
                _log.warning("tenant request refused: %s", exc.code, exc_info=exc)
            await reject(scope, receive, send, exc)
            return
        state = scope.get("state")
        before: list[BeforeResponse] = []
        scope = {
            **scope,
            "state": {**state, "tenant": tenant} if state else {"tenant": tenant},
            BEFORE_RESPONSE_KEY: before,
        }
        token = enter_request(tenant)  # tenant_scope's rules, in one call
        try:
            await self._run(scope, receive, send, before)
        finally:
            exit_request(token)

    def _is_exempt(self, scope: Scope) -> bool:
        if self._exempt is None:
            return False
        path = route_path(scope)
        if "/./" in path + "/" or "/../" in path + "/":
            return False  # dot segments: the router and a proxy may disagree on what they name
        return self._exempt.match(path) is not None

    async def _check_member(self, connection: HTTPConnection, tenant: Tenant) -> None:
        if self._authorize is None:
            return
        try:
            allowed: Any = self._authorize(connection, tenant)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except Exception:
            _log.exception("authorize hook raised; request denied")
            allowed = False
        if allowed is not True:  # only an explicit True lets the caller in
            raise TenantNotFound()

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, before: list[BeforeResponse] | None = None
    ) -> None:
        # A TenancyError from downstream (no Starlette handler for it) still gets a problem
        # response while nothing has been sent; once started, it can only propagate.
        started = False
        refused: TenancyError | None = None

        async def guarded_send(message: Message) -> None:
            nonlocal started, refused
            if message["type"] in _STARTS:
                while before:  # what the response needs first (a stream's connection)
                    try:
                        await before.pop(0)()
                    except TenancyError as exc:
                        refused = exc
                        raise
                started = True
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except TenancyError as exc:
            if started:
                raise
            await reject(scope, receive, send, refused or exc)
            if refused is None and exc.status_code >= 500:
                raise
        except Exception:
            # Starlette's handlers wrap an error raised from inside send ("response already
            # started", by their count): the refusal is answered, nothing was sent yet.
            if refused is None or started:
                raise
            await reject(scope, receive, send, refused)


_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.close"})


def _compile_exempt(paths: Iterable[str]) -> re.Pattern[str] | None:
    if isinstance(paths, str):
        raise IsolationConfigError("exempt takes a list of paths", hint="exempt=['/health']")
    cleaned = []
    for path in paths:
        path = path.rstrip("/") if isinstance(path, str) else ""
        if not _EXEMPT_PATH.match(path) or "/./" in path + "/" or "/../" in path + "/":
            raise IsolationConfigError(
                "an exempt path must be an absolute path below '/'",
                hint="e.g. '/health' or '/docs'; '/' would exempt everything",
            )
        cleaned.append(re.escape(path))
    if not cleaned:
        return None
    # Whole segments only: '/docs' exempts '/docs' and '/docs/x', never '/documents'.
    return re.compile(r"(?:" + "|".join(cleaned) + r")(?:/|\Z)")
