"""OpenTelemetry: ``tenant.id`` on spans, per-tenant request metrics, a SQL comment (extra:
``opentelemetry``).

Works with the standard instrumentations as they are (ASGI, FastAPI, SQLAlchemy):

- ``TenantSpanProcessor`` stamps ``tenant.id`` on every span started inside a tenant scope:
  database spans, outgoing calls, your own spans;
- ``TenantTelemetryMiddleware`` puts it on the request's server span (started before the tenant
  is known) and records a request counter and a duration histogram per tenant, with at most
  ``max_tenants`` tenant labels per process and the others under ``"_other"``;
- ``enable_sql_comment(engine)`` (off until called) appends ``/*tenant='acme'*/`` to every
  statement run in a tenant scope, so the server's logs and ``pg_stat_activity`` say whose it is.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import current_tenant_or_none
from .errors import IsolationConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "DEFAULT_MAX_TENANTS",
    "DURATION_METRIC",
    "OVERFLOW_TENANT",
    "REQUESTS_METRIC",
    "TENANT_ATTRIBUTE",
    "TenantSpanProcessor",
    "TenantTelemetryMiddleware",
    "enable_sql_comment",
    "sql_comment",
]

TENANT_ATTRIBUTE = "tenant.id"
OVERFLOW_TENANT = "_other"  # never a tenant id: those start with a letter or a digit
DEFAULT_MAX_TENANTS = 100
REQUESTS_METRIC = "tenancy.server.requests"
DURATION_METRIC = "tenancy.server.request.duration"
_STATUS_ATTRIBUTE = "http.response.status_code"


class TenantSpanProcessor(SpanProcessor):
    """Set ``tenant.id`` on each span started inside a tenant scope (add it to the provider)."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        tenant = current_tenant_or_none()
        if tenant is not None:
            span.set_attribute(TENANT_ATTRIBUTE, tenant.id)

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _TenantLabels:
    """The first ``cap`` tenants seen keep their own label; every later one is ``_other``."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant_id: str) -> str:
        if tenant_id in self._seen:
            return tenant_id
        with self._lock:
            if tenant_id not in self._seen and len(self._seen) >= self._cap:
                return OVERFLOW_TENANT
            self._seen.add(tenant_id)
        return tenant_id


class TenantTelemetryMiddleware:
    """Pure ASGI: ``tenant.id`` on the server span, and per-tenant request metrics.

    Add it inside the OpenTelemetry middleware (``FastAPIInstrumentor`` puts that outermost);
    inside or outside ``TenancyMiddleware`` alike. Only requests served in a tenant scope are
    counted (``tenancy.server.requests``, ``tenancy.server.request.duration`` in seconds, with
    ``tenant.id`` and ``http.response.status_code``); rejected and exempt ones are not.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        max_tenants: int = DEFAULT_MAX_TENANTS,
    ) -> None:
        if isinstance(max_tenants, bool) or not isinstance(max_tenants, int) or max_tenants < 0:
            raise IsolationConfigError("max_tenants must be a non-negative integer")
        self.app = app
        meter = metrics.get_meter("asgi_tenancy", meter_provider=meter_provider)
        self._requests = meter.create_counter(
            REQUESTS_METRIC, unit="{request}", description="Requests served in a tenant scope"
        )
        self._duration = meter.create_histogram(
            DURATION_METRIC, unit="s", description="Duration of requests served in a tenant scope"
        )
        self._label = _TenantLabels(max_tenants)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        span = trace.get_current_span()  # the server span, while the app runs inside it
        start = time.perf_counter()
        tenant_id: str | None = None
        status: int | None = None

        def note_tenant() -> None:
            # Inside TenancyMiddleware the scope is there at once; outside it, the app's first
            # send happens inside the scope.
            nonlocal tenant_id
            tenant = current_tenant_or_none()
            if tenant_id is None and tenant is not None:
                tenant_id = tenant.id
                span.set_attribute(TENANT_ATTRIBUTE, tenant_id)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                note_tenant()
            elif message["type"] == "websocket.accept":
                note_tenant()
            await send(message)

        note_tenant()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            if scope["type"] == "http" and tenant_id is not None:
                attributes: dict[str, Any] = {TENANT_ATTRIBUTE: self._label(tenant_id)}
                if status is not None:
                    attributes[_STATUS_ATTRIBUTE] = status
                self._requests.add(1, attributes)
                self._duration.record(time.perf_counter() - start, attributes)


def sql_comment(tenant_id: str) -> str:
    """``/*tenant='acme'*/``, sqlcommenter style: the value URL-encoded, so no quote or ``*/``."""
    return f"/*tenant='{urllib.parse.quote(tenant_id, safe='')}'*/"


def _comment_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    tenant = current_tenant_or_none()
    if tenant is None:
        return statement, parameters
    last_line = statement.rsplit("\n", 1)[-1]
    separator = "\n" if "--" in last_line else " "  # never inside a trailing line comment
    return f"{statement}{separator}{sql_comment(tenant.id)}", parameters


def enable_sql_comment(engine: AsyncEngine | Engine) -> None:
    """Append the tenant's SQL comment to each statement ``engine`` runs in a tenant scope.

    Off unless called. Each tenant's statements then differ in text, so a driver's statement
    cache holds one entry per tenant and statement (see the benchmarks page before enabling).
    Call it after ``TenantDatabase(engine, ...)``: the library's statement checks then see the
    statement before the comment is added.
    """
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import AsyncEngine

    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if not event.contains(sync_engine, "before_cursor_execute", _comment_statement):
        event.listen(sync_engine, "before_cursor_execute", _comment_statement, retval=True)
