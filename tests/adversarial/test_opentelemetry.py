"""OpenTelemetry on a real database: FastAPI and SQLAlchemy instrumented by the standard packages.

Spans and metrics are read from the SDK's in-memory exporter and reader; requests of two tenants
run concurrently, so a tenant id carried over from one request to another would show.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_tenancy import (
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
    tenant_scope,
)
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.opentelemetry import (
    DURATION_METRIC,
    OVERFLOW_TENANT,
    REQUESTS_METRIC,
    TENANT_ATTRIBUTE,
    TenantSpanProcessor,
    TenantTelemetryMiddleware,
    enable_sql_comment,
)
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.adversarial.leaks import assert_no_foreign_rows
from tests.adversarial.models import ROWS_PER_TENANT, Base, Project
from tests.conftest import PgDatabase

TENANTS = ("acme", "globex", "initech")


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


@pytest.fixture
async def database(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> AsyncIterator[TenantDatabase]:
    db = TenantDatabase(rls_database.app_url, rls_strategy, engine_options={"pool_size": 5})
    await db.validate()
    yield db
    await db.dispose()


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.spans.get_finished_spans()

    def points(self, name: str) -> dict[str | None, Any]:
        """Data points of one metric, by tenant label."""
        data = self.metrics.get_metrics_data()
        found: dict[str | None, Any] = {}
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            label = point.attributes.get(TENANT_ATTRIBUTE)
                            assert label not in found, "one point per tenant (one status here)"
                            found[label] = point
        return found


@pytest.fixture
def telemetry(database: TenantDatabase) -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(TenantSpanProcessor())
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = SQLAlchemyInstrumentor()
    # opentelemetry-instrumentation-sqlalchemy 0.66b declares sqlalchemy < 2.1 and would do
    # nothing on 2.1 without skip_dep_check; its engine events work on 2.1 as they are.
    instrumentor.instrument(
        engine=database.engine.sync_engine, tracer_provider=tracer_provider, skip_dep_check=True
    )
    try:
        yield Telemetry(spans, reader, tracer_provider, meter_provider)
    finally:
        instrumentor.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def _app(
    database: TenantDatabase, telemetry: Telemetry, *, max_tenants: int = 100, inside: bool = True
) -> FastAPI:
    app = FastAPI()
    store = InMemoryTenantStore(Tenant(t) for t in (*TENANTS, "hooli", "pied-piper"))
    observe = {"meter_provider": telemetry.meter_provider, "max_tenants": max_tenants}
    if inside:  # added first: it runs inside TenancyMiddleware
        app.add_middleware(TenantTelemetryMiddleware, **observe)  # type: ignore[arg-type]
    app.add_middleware(
        TenancyMiddleware, resolvers=[HeaderResolver()], store=store, exempt=["/health"]
    )
    if not inside:
        app.add_middleware(TenantTelemetryMiddleware, **observe)  # type: ignore[arg-type]
    setup_tenancy(app, database=database)

    @app.get("/projects")
    async def projects(session: Annotated[AsyncSession, Depends(tenant_session)]) -> list[str]:
        names = list((await session.scalars(select(Project.name))).all())
        await asyncio.sleep(0)  # let the other requests' spans start in between
        await session.commit()  # a second transaction, a second set of database spans
        count = await session.scalar(text("SELECT count(*) FROM projects"))
        assert count == len(names)
        return names

    @app.get("/health")
    async def health() -> str:
        return "ok"

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    return app


async def _get(app: FastAPI, requests: list[tuple[str, str | None]]) -> list[httpx.Response]:
    """Concurrent GETs of (path, tenant header), each tagged with ?expect=<tenant>."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await asyncio.gather(
            *(
                client.get(
                    path,
                    params={"expect": tenant or "-"},
                    headers={} if tenant is None else {"x-tenant-id": tenant},
                )
                for path, tenant in requests
            )
        )


def _expected_tenant(server: ReadableSpan) -> str:
    text = " ".join(str(v) for v in (server.attributes or {}).values())
    found = re.search(r"expect=([\w.-]+)", text)
    assert found is not None, server.attributes
    return found.group(1)


@pytest.mark.parametrize("inside", [True, False], ids=["inside-tenancy", "outside-tenancy"])
async def test_server_and_database_spans_carry_their_own_requests_tenant(
    database: TenantDatabase, telemetry: Telemetry, inside: bool
) -> None:
    app = _app(database, telemetry, inside=inside)
    requests = [("/projects", TENANTS[i % 3]) for i in range(30)]
    async with app.router.lifespan_context(app):
        responses = await _get(app, requests)
    for (_, tenant), response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        assert len(response.json()) == ROWS_PER_TENANT
        assert_no_foreign_rows(response.json(), tenant or "")

    spans = telemetry.finished()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == len(requests)
    by_trace: dict[int, str] = {}
    for server in servers:
        assert server.attributes is not None
        assert server.attributes[TENANT_ATTRIBUTE] == _expected_tenant(server)
        by_trace[server.context.trace_id] = _expected_tenant(server)
    requests_spans = [s for s in spans if s.context.trace_id in by_trace]
    db_spans = [s for s in requests_spans if (s.attributes or {}).get("db.system") == "postgresql"]
    assert len(db_spans) >= 2 * len(requests)  # both statements of every request
    for span in requests_spans:
        assert span.attributes is not None
        assert span.attributes.get(TENANT_ATTRIBUTE) == by_trace[span.context.trace_id], span.name
    for span in spans:  # start-up's validation, outside any request: no tenant
        if span.context.trace_id not in by_trace:
            assert TENANT_ATTRIBUTE not in (span.attributes or {}), span.name


async def test_spans_outside_a_tenant_scope_carry_no_tenant(
    database: TenantDatabase, telemetry: Telemetry
) -> None:
    app = _app(database, telemetry)
    async with app.router.lifespan_context(app):
        health, unknown, missing = await _get(
            app, [("/health", None), ("/projects", "umbrella"), ("/projects", None)]
        )
    assert (health.status_code, unknown.status_code, missing.status_code) == (200, 404, 400)
    spans = telemetry.finished()
    assert spans
    assert all(TENANT_ATTRIBUTE not in (s.attributes or {}) for s in spans)
    assert telemetry.points(REQUESTS_METRIC) == {}  # counted only when served in a scope


async def test_request_metrics_per_tenant_with_a_bounded_label_set(
    database: TenantDatabase, telemetry: Telemetry
) -> None:
    app = _app(database, telemetry, max_tenants=2)
    order = ["acme", "globex", "acme", "initech", "hooli", "globex", "pied-piper", "initech"]
    async with app.router.lifespan_context(app):
        for tenant in order:  # one at a time: which tenants arrive first is then known
            (response,) = await _get(app, [("/projects", tenant)])
            assert response.status_code == 200
    requests = telemetry.points(REQUESTS_METRIC)
    durations = telemetry.points(DURATION_METRIC)
    assert {k: p.value for k, p in requests.items()} == {"acme": 2, "globex": 2, OVERFLOW_TENANT: 4}
    assert {k: p.count for k, p in durations.items()} == {
        "acme": 2,
        "globex": 2,
        OVERFLOW_TENANT: 4,
    }
    assert all(p.attributes["http.response.status_code"] == 200 for p in requests.values())
    assert all(0 < p.sum < 60 for p in durations.values())  # seconds


async def _statement_seen_by_server(session: AsyncSession, sql: str) -> str:
    seen = str(await session.scalar(text(sql)))
    await session.commit()  # pg_stat_activity is read once per transaction
    return seen


OWN_QUERY = "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()"


async def test_the_sql_comment_is_off_unless_enabled_then_names_the_tenant(
    database: TenantDatabase,
) -> None:
    async with tenant_scope(Tenant("acme")), database.session() as session:
        before = await _statement_seen_by_server(session, OWN_QUERY)
    assert "/*" not in before
    enable_sql_comment(database.engine)
    enable_sql_comment(database.engine)  # idempotent: one comment, not two
    for tenant in ("acme", "globex"):
        async with tenant_scope(Tenant(tenant)), database.session() as session:
            seen = await _statement_seen_by_server(session, OWN_QUERY)
            trailing = await _statement_seen_by_server(session, OWN_QUERY + " -- a note")
            names = (await session.scalars(select(Project.name))).all()
        assert seen == f"{OWN_QUERY} /*tenant='{tenant}'*/"
        assert trailing.endswith(f"-- a note\n/*tenant='{tenant}'*/")
        assert len(names) == ROWS_PER_TENANT  # isolation unchanged
        assert_no_foreign_rows(names, tenant)


async def test_the_sql_comment_reads_back_as_the_tenant_id(database: TenantDatabase) -> None:
    enable_sql_comment(database.engine)
    for tenant in ("acme", "a.b_c-d", "Z9"):
        await _probe_comment(database, tenant)


async def _probe_comment(database: TenantDatabase, tenant: str) -> None:
    async with tenant_scope(Tenant(tenant)), database.session() as session:
        seen = await _statement_seen_by_server(session, OWN_QUERY)
    found = re.fullmatch(re.escape(OWN_QUERY) + r" /\*tenant='([^'*]*)'\*/", seen)
    assert found is not None, seen
    assert urllib.parse.unquote(found.group(1)) == tenant
