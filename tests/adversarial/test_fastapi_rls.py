"""FastAPI end to end on a real database: a tenant whose pool is exhausted gets a 503."""

from __future__ import annotations

import asyncio
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_tenancy import HeaderResolver, InMemoryTenantStore, TenancyMiddleware, Tenant
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.adversarial.models import Base
from tests.conftest import PgDatabase


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


async def test_an_exhausted_pool_answers_503_not_500(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    database = TenantDatabase(
        rls_database.app_url,
        rls_strategy,
        engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2},
    )
    holding, release = asyncio.Event(), asyncio.Event()
    app = FastAPI()
    app.add_middleware(
        TenancyMiddleware, resolvers=[HeaderResolver()], store=InMemoryTenantStore([Tenant("acme")])
    )
    setup_tenancy(app, database=database)

    @app.get("/hold")
    async def hold(session: Annotated[AsyncSession, Depends(tenant_session)]) -> int:
        count = int(await session.scalar(text("SELECT count(*) FROM projects")) or 0)
        holding.set()
        await release.wait()
        return count

    @app.get("/count")
    async def count(session: Annotated[AsyncSession, Depends(tenant_session)]) -> int:
        return int(await session.scalar(text("SELECT count(*) FROM projects")) or 0)

    headers = {"x-tenant-id": "acme"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.create_task(client.get("/hold", headers=headers))
            await holding.wait()
            busy = await client.get("/count", headers=headers)
            release.set()
            held = await first
            after = await client.get("/count", headers=headers)
    assert busy.status_code == 503
    assert busy.json()["code"] == "tenant_capacity_exceeded"
    assert held.status_code == 200
    assert after.status_code == 200
