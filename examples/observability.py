"""Traces, metrics and logs that say which tenant (docs/observability.md).

The standard instrumentations as they are, plus a span processor, a middleware and a log field.
"""

from __future__ import annotations

import logging
from typing import Annotated

import structlog
from fastapi import Depends, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_tenancy import HeaderResolver, TenancyMiddleware, TenantLogFilter, TenantStore
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.log import add_tenant_id
from asgi_tenancy.opentelemetry import (
    TenantSpanProcessor,
    TenantTelemetryMiddleware,
    enable_sql_comment,
)
from asgi_tenancy.sqlalchemy import TenantDatabase
from examples.jobs.database import Invoice


def tracer_provider(export: SpanProcessor) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(TenantSpanProcessor())  # first: stamps spans as they start
    provider.add_span_processor(export)  # e.g. BatchSpanProcessor(OTLPSpanExporter())
    return provider


def create_app(
    db: TenantDatabase, store: TenantStore, tracing: TracerProvider, meters: MeterProvider
) -> FastAPI:
    app = FastAPI()
    # At most 100 tenants get a metric label of their own; the others count under "_other".
    app.add_middleware(TenantTelemetryMiddleware, meter_provider=meters, max_tenants=100)
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    setup_tenancy(app, database=db)

    @app.get("/invoices")
    async def invoices(session: Annotated[AsyncSession, Depends(tenant_session)]) -> list[int]:
        structlog.get_logger().info("listing invoices")  # carries tenant_id
        return list((await session.scalars(select(Invoice.number))).all())

    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing, meter_provider=meters)
    # Database spans: the standard instrumentation on the tenant engine. (0.66b declares
    # SQLAlchemy < 2.1: skip_dep_check lets it run on 2.1, where its engine events work.)
    SQLAlchemyInstrumentor().instrument(
        engine=db.engine.sync_engine, tracer_provider=tracing, skip_dep_check=True
    )
    enable_sql_comment(db.engine)  # optional: /*tenant='acme'*/ in the server's logs
    return app


def configure_logging(handler: logging.Handler) -> None:
    """The same ``tenant_id`` field in stdlib records and structlog events."""
    handler.addFilter(TenantLogFilter())
    handler.setFormatter(logging.Formatter("%(tenant_id)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_tenant_id,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
