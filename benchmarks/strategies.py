"""Per strategy: GET /items/{id} through TenancyMiddleware + tenant_session, against the same
endpoint in plain FastAPI with an unscoped AsyncSession filtering the tenant by hand.

Requests are in-process ASGI calls, 7 interleaved rounds; round trips per request are counted
on the wire through a loopback proxy in a separate pass. Prints one JSON object; targets:
ratio >= 0.85 (0.95 ideal) and no round trip beyond the baseline's three.
"""

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
)
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from benchmarks.common import create_app_role, interleave, machine, median, peak_rss_mb, postgres
from benchmarks.middleware import _call
from benchmarks.wire import WireProxy

ROUNDS, REQUESTS, ITEMS, TENANTS = 7, 1000, 100, ("acme", "globex")

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("name", String),
)
plain_metadata = MetaData()
plain_items = items.to_metadata(plain_metadata, name="items_plain")


def _scope(tenant: str, item: int) -> dict[str, Any]:
    path = f"/items/{item}"
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tenant-id", tenant.encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("bench", 80),
    }


def baseline_app(engine: AsyncEngine) -> FastAPI:
    """What a team writes by hand: read the header, filter every query on it."""
    app = FastAPI()

    async def session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine, expire_on_commit=False) as s:
            yield s

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, request: Request, s: Annotated[AsyncSession, Depends(session)]
    ) -> dict[str, Any]:
        tenant = request.headers["x-tenant-id"]
        row = (
            await s.execute(
                select(plain_items).where(
                    plain_items.c.tenant_id == tenant, plain_items.c.id == item_id
                )
            )
        ).one_or_none()
        if row is None:
            raise HTTPException(404)
        return {"id": row.id, "name": row.name}

    return app


def scoped_app(database: TenantDatabase) -> FastAPI:
    app = FastAPI()
    store = CachedTenantStore(InMemoryTenantStore(Tenant(t) for t in TENANTS))
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    setup_tenancy(app, database=database)

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, s: Annotated[AsyncSession, Depends(tenant_session)]
    ) -> dict[str, Any]:
        row = (await s.execute(select(items).where(items.c.id == item_id))).one_or_none()
        if row is None:
            raise HTTPException(404)
        return {"id": row.id, "name": row.name}

    return app


SIGNING_KEY = "benchmark-signing-key-0123456789abcdef"


async def _set_up_row(admin_url: URL, *, signed: bool = False) -> RowLevelSecurity:
    strategy = RowLevelSecurity(
        metadata=metadata,
        shared_tables={"items_plain"},
        signed=signed,
        signing_keys=[SIGNING_KEY] if signed else (),
    )
    admin = create_async_engine(admin_url)
    async with admin.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS items, items_plain CASCADE"))
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(plain_metadata.create_all)
        await strategy.install(conn)
        rows = [
            {"tenant_id": t, "id": i, "name": f"{t}-{i}"}
            for t in TENANTS
            for i in range(1, ITEMS + 1)
        ]
        await conn.execute(insert(items), rows)
        await conn.execute(insert(plain_items), rows)
    await admin.dispose()
    return strategy


async def _set_up_row_signed(admin_url: URL) -> RowLevelSecurity:
    return await _set_up_row(admin_url, signed=True)


SETUPS: dict[str, Callable[[URL], Awaitable[Any]]] = {
    "row": _set_up_row,
    "row_signed": _set_up_row_signed,
}


@asynccontextmanager
async def _served(app: FastAPI) -> AsyncIterator[FastAPI]:
    async with app.router.lifespan_context(app):
        yield app


async def _requests(app: FastAPI, n: int) -> None:
    for i in range(n):
        status = await _call(app, _scope(TENANTS[i % 2], (i % ITEMS) + 1))
        assert status == 200, status


async def measure(name: str, admin_url: URL, app_url: URL) -> dict[str, object]:
    strategy = await SETUPS[name](admin_url)
    baseline_engine = create_async_engine(app_url)
    database = TenantDatabase(app_url, strategy)
    plain, scoped = baseline_app(baseline_engine), scoped_app(database)
    async with _served(scoped):
        await interleave(
            1, {"baseline": lambda: _requests(plain, 200), "scoped": lambda: _requests(scoped, 200)}
        )
        times = await interleave(
            ROUNDS,
            {
                "baseline": lambda: _requests(plain, REQUESTS),
                "scoped": lambda: _requests(scoped, REQUESTS),
            },
        )
    await baseline_engine.dispose()

    trips = {}
    async with WireProxy(**_target(app_url)) as proxy:
        proxied = app_url.set(host="127.0.0.1", port=proxy.port, query={})
        counted_engine = create_async_engine(proxied)
        counted_db = TenantDatabase(proxied, strategy)
        for label, app in (
            ("baseline", baseline_app(counted_engine)),
            ("scoped", scoped_app(counted_db)),
        ):
            async with _served(app):
                await _requests(app, 50)  # connect, prepare, warm caches
                before = proxy.counter.round_trips
                await _requests(app, 200)
                trips[label] = (proxy.counter.round_trips - before) / 200
        await counted_engine.dispose()

    base_rps = REQUESTS / median(times["baseline"])
    scoped_rps = REQUESTS / median(times["scoped"])
    return {
        "baseline_rps": round(base_rps),
        "scoped_rps": round(scoped_rps),
        "ratio": round(scoped_rps / base_rps, 3),
        "added_us_per_request": round((1 / scoped_rps - 1 / base_rps) * 1e6, 1),
        "round_trips_per_request": trips,
    }


def _target(url: URL) -> dict[str, Any]:
    socket_dir = url.query.get("host")
    if socket_dir:
        return {"unix_path": f"{socket_dir}/.s.PGSQL.{url.port or 5432}"}
    return {"host": url.host, "port": url.port or 5432}


async def main(names: list[str]) -> dict[str, object]:
    results: dict[str, object] = {}
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        for name in names:
            results[name] = await measure(name, admin_url, app_url)
    return {
        "benchmark": "strategies",
        "endpoint": "GET /items/{id}",
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "results": results,
        "target_ratio_min": 0.85,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:] or list(SETUPS))), indent=2))
