"""The app ``test_load_faults.py`` serves through uvicorn: ``uvicorn --factory`` on ``create_app``.

It reads one deployment of ``deployments.py`` from ``TENANCY_LOAD_SPEC`` (JSON: the kind, the
app URL, the tenants' database URLs) and serves ``GET /items`` (the tenant's rows), ``POST
/items/{id}`` (one row, acknowledged with 201 after its commit), ``GET /stream`` (the tenant's
rows as a streamed body, one per line, then ``end``) and ``GET /slow/{ms}`` (a query that holds
its connection; ``?timeout_ms=`` sets a statement timeout for it).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
)
from asgi_tenancy.fastapi import current_tenant, setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    IsolationStrategy,
    RowLevelSecurity,
    SchemaPerTenant,
    TenantDatabase,
)
from tests.adversarial.deployments import plain_metadata, row_metadata

POOL = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 0.5}

Session = Annotated[AsyncSession, Depends(tenant_session)]
Owner = Annotated[Tenant, Depends(current_tenant)]


def _strategy(kind: str) -> IsolationStrategy:
    if kind == "row":
        return RowLevelSecurity(metadata=row_metadata)
    if kind == "schema":
        return SchemaPerTenant(metadata=plain_metadata, shared_schema=None)
    return DatabasePerTenant(pool_size_per_engine=3, max_connections=12, acquire_timeout=0.5)


def create_app() -> FastAPI:
    spec: dict[str, Any] = json.loads(os.environ["TENANCY_LOAD_SPEC"])
    kind = spec["kind"]
    database = TenantDatabase(
        spec["app_url"],
        _strategy(kind),
        engine_options=None if kind == "database" else POOL,
    )
    tenants = [
        Tenant(t, attributes={"database_url": url} if url else {})
        for t, url in spec["tenants"].items()
    ]
    app = FastAPI()
    app.add_middleware(
        TenancyMiddleware,
        resolvers=[HeaderResolver()],
        store=CachedTenantStore(InMemoryTenantStore(tenants)),
    )
    setup_tenancy(app, database=database)
    owned = kind == "row"  # only the row deployment's table has a tenant column

    @app.get("/items")
    async def items(session: Session) -> list[str]:
        return list((await session.scalars(text("SELECT body FROM items ORDER BY id"))).all())

    @app.get("/stream")
    async def stream(session: Session) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            result = await session.stream_scalars(text("SELECT body FROM items ORDER BY id"))
            async for body in result:
                yield f"{body}\n"
            yield "end\n"

        return StreamingResponse(lines(), media_type="text/plain")

    @app.post("/items/{item_id}", status_code=201)
    async def add(item_id: int, session: Session, tenant: Owner) -> int:
        columns, values = ("tenant_id, id, body", ":t, :i, :b") if owned else ("id, body", ":i, :b")
        await session.execute(
            text(f"INSERT INTO items ({columns}) VALUES ({values})"),
            {"t": tenant.id, "i": item_id, "b": f"{tenant.id}-w-{item_id}"},
        )
        await session.commit()  # 201 means committed
        return item_id

    @app.get("/slow/{ms}")
    async def slow(ms: int, session: Session, timeout_ms: int = 0) -> int:
        if timeout_ms:
            await session.execute(
                text("SELECT set_config('statement_timeout', :v, true)"), {"v": f"{timeout_ms}ms"}
            )
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": ms / 1000})
        return ms

    return app
