"""The examples that docs/jobs.md, docs/observability.md and docs/keys.md include, run for real.

Celery's example runs in a worker process of its own, arq's in an in-process burst worker, both
on the session's Redis; the database is PostgreSQL under RLS, read back as the admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import InMemoryTenantStore, Tenant, TenantContextError, tenant_scope
from asgi_tenancy.keyspace import InvalidKeyPart
from asgi_tenancy.sqlalchemy import create_tenants_table
from tests.conftest import PgDatabase
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "example-snapshot-key-0123456789abcdef"
EXAMPLES = ("examples.jobs.database", "examples.jobs.celery_app", "examples.jobs.arq_app")


@pytest.fixture(scope="module")
def example_env(pg_database: PgDatabase, redis_server: RedisServer) -> Iterator[dict[str, str]]:
    """The examples' environment, their tables, and fresh imports that read it."""
    env = {
        "DATABASE_URL": pg_database.app_url,
        "ADMIN_DATABASE_URL": pg_database.admin_url,
        "REDIS_URL": redis_server.url(4),
        "TENANCY_SNAPSHOT_KEY": KEY,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in EXAMPLES:
            sys.modules.pop(name, None)
        database = importlib.import_module("examples.jobs.database")
        asyncio.run(_set_up(pg_database.admin_url, database))
        try:
            yield env
        finally:
            asyncio.run(database.db.dispose())
            asyncio.run(database.store.engine.dispose())
            for name in EXAMPLES:
                sys.modules.pop(name, None)


async def _set_up(admin_url: str, database: ModuleType) -> None:
    engine = create_async_engine(admin_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(database.Base.metadata.create_all)
            await database.strategy.install(conn)
        table = await create_tenants_table(engine)
        async with engine.begin() as conn:
            await conn.execute(insert(table), [{"id": "acme"}, {"id": "globex"}])
    finally:
        await engine.dispose()


@pytest.fixture
async def pools(example_env: dict[str, str]) -> AsyncIterator[None]:
    """Close the examples' pools in the event loop of the test that opened them."""
    from examples.jobs.database import db, store

    yield
    await db.dispose()
    await store.engine.dispose()


async def _invoices(admin: AsyncEngine) -> set[tuple[str, int, int]]:
    async with admin.begin() as conn:
        rows = await conn.execute(text("SELECT tenant_id, number, total FROM invoices"))
        found = {(r.tenant_id, r.number, r.total) for r in rows}
        await conn.execute(text("TRUNCATE invoices"))
    return found


@pytest.fixture(scope="module")
def celery_example(example_env: dict[str, str]) -> Iterator[ModuleType]:
    module = importlib.import_module("examples.jobs.celery_app")
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "examples.jobs.celery_app", "worker",
                "--pool", "prefork", "--concurrency", "1", "--loglevel", "WARNING",
                "--without-heartbeat", "--without-gossip", "--without-mingle",
            ],
            cwd=ROOT, env={**os.environ, **example_env, "PYTHONPATH": str(ROOT)},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield module
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            gc.collect()  # results unsubscribe from Redis when collected: while it runs


async def test_the_celery_example_records_each_invoice_in_its_tenant(
    celery_example: ModuleType, admin_engine: AsyncEngine
) -> None:
    with tenant_scope(Tenant("acme")):
        acme = celery_example.bill(1, 100)
    with tenant_scope(Tenant("globex")):
        globex = celery_example.bill(1, 250)  # the same number: a colliding key
    unscoped = celery_example.record_invoice.delay(2, 5)
    assert acme.get(timeout=60) == "acme"
    assert globex.get(timeout=60) == "globex"
    assert isinstance(unscoped.get(timeout=60, propagate=False), TenantContextError)
    report = celery_example.count_invoices_of_every_tenant.delay().get(timeout=60)
    assert report == {"acme": 1, "globex": 1}
    assert await _invoices(admin_engine) == {("acme", 1, 100), ("globex", 1, 250)}


async def _burst(module: ModuleType) -> None:
    from arq.worker import create_worker

    worker = create_worker(module.WorkerSettings, burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        with warnings.catch_warnings():  # arq 0.28 calls redis-py's deprecated close()
            warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
            await worker.close()


@pytest.mark.usefixtures("pools")
async def test_the_arq_example_records_each_invoice_in_its_tenant(
    example_env: dict[str, str], admin_engine: AsyncEngine
) -> None:
    from arq.jobs import Job

    module = importlib.import_module("examples.jobs.arq_app")
    redis = await module.connect()
    try:
        async with tenant_scope(Tenant("acme")):
            acme = await module.bill(redis, 10, 100)
        async with tenant_scope(Tenant("globex")):
            globex = await module.bill(redis, 10, 250)
        unscoped = await redis.enqueue_job("record_invoice", 11, 5)
        await _burst(module)
        report = await redis.enqueue_job("count_invoices_of_every_tenant")  # after the others
        await _burst(module)
        outcomes = [
            (await Job(job.job_id, redis).result_info()).result  # type: ignore[union-attr]
            for job in (acme, globex, unscoped, report)
        ]
    finally:
        await redis.aclose()
    assert outcomes[:2] == ["acme", "globex"]
    assert isinstance(outcomes[2], TenantContextError)
    assert outcomes[3] == {"acme": 1, "globex": 1}
    assert await _invoices(admin_engine) == {("acme", 10, 100), ("globex", 10, 250)}


@pytest.mark.usefixtures("pools")
async def test_the_observability_example_names_the_tenant_in_traces_metrics_and_logs(
    example_env: dict[str, str], admin_engine: AsyncEngine
) -> None:
    from examples import observability
    from examples.jobs.database import db

    async with admin_engine.begin() as conn:
        await conn.execute(text("INSERT INTO invoices VALUES ('acme', 7, 1), ('globex', 7, 2)"))
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracing = observability.tracer_provider(SimpleSpanProcessor(spans))
    meters = MeterProvider(metric_readers=[reader])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    observability.configure_logging(handler)
    store = InMemoryTenantStore([Tenant("acme"), Tenant("globex")])
    app = observability.create_app(db, store, tracing, meters)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.get("/invoices", headers={"x-tenant-id": "acme"})
    finally:
        SQLAlchemyInstrumentor().uninstrument()
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
        structlog.reset_defaults()
        tracing.shutdown()
        meters.shutdown()
    assert response.json() == [7]
    request_spans = [s for s in spans.get_finished_spans() if "tenant.id" in (s.attributes or {})]
    assert {s.attributes["tenant.id"] for s in request_spans} == {"acme"}  # type: ignore[index]
    assert any((s.attributes or {}).get("db.system") == "postgresql" for s in request_spans)
    line = next(line for line in stream.getvalue().splitlines() if "listing invoices" in line)
    prefix, _, event = line.partition(" INFO ")
    assert prefix == "acme"  # the stdlib filter's field ...
    assert json.loads(event.split(" ", 1)[1])["tenant_id"] == "acme"  # ... and structlog's
    metrics = reader.get_metrics_data()
    assert metrics is not None
    names = {m.name for r in metrics.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert {"tenancy.server.requests", "tenancy.server.request.duration"} <= names
    await _invoices(admin_engine)


async def test_the_cache_example_keeps_tenants_apart_in_a_real_redis(
    redis_server: RedisServer,
) -> None:
    from examples import cache_keys

    redis = Redis.from_url(redis_server.url(5))
    loads: list[tuple[str, Any]] = []

    def loader(tenant: str) -> Any:
        async def load(user_id: int | str) -> str:
            loads.append((tenant, user_id))
            return f"{tenant}-profile-{user_id}"

        return load

    try:
        await redis.flushdb()
        for tenant in ("acme", "acme-corp", "globex", "acme"):
            async with tenant_scope(Tenant(tenant)):
                assert await cache_keys.cached_profile(redis, 42, loader(tenant)) == (
                    f"{tenant}-profile-42"
                )
        assert loads == [("acme", 42), ("acme-corp", 42), ("globex", 42)]  # acme's was cached
        async with tenant_scope(Tenant("acme")):
            for crafted in ("42:x", "*", "../globex", "%2F", "acme-corp:profile:42"):
                with pytest.raises(InvalidKeyPart):
                    await cache_keys.cached_profile(redis, crafted, loader("acme"))
            assert await cache_keys.clear_tenant_cache(redis) == 1
            assert cache_keys.invoice_path(17) == "uploads/acme/invoices/17.pdf"
            assert cache_keys.invoices_prefix() == "uploads/acme/invoices/"
        left = sorted(k.decode() for k in await redis.keys("*"))
        assert left == ["cache:acme-corp:profile:42", "cache:globex:profile:42"]
        with pytest.raises(TenantContextError):
            await cache_keys.clear_tenant_cache(redis)
    finally:
        await redis.flushdb()
        await redis.aclose()
