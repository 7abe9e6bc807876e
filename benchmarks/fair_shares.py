"""Fair shares (issue 20): what ``FairShares`` costs a request, and what a flood does to the
others, row-level security on one shared pool, FastAPI in process.

- cost: ``GET /items/{id}`` sequentially for one tenant, interleaved rounds, a TenantDatabase
  without shares against one with ``FairShares(connections=2)`` and one that also sends a
  ``statement_timeout`` in every BEGIN message.
- neighbours: nine tenants each send ``GET /items/{id}`` back to back, all at once; their p50
  and p99 latency and status counts, with no flood, and while a tenth tenant keeps
  ``FLOODERS`` requests of ``pg_sleep`` in flight: with shares, and without (for contrast).

Prints one JSON object. ``python -m benchmarks.fair_shares``.
"""

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from asgi_tenancy import HeaderResolver, InMemoryTenantStore, TenancyMiddleware, Tenant
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import FairShares, RowLevelSecurity, TenantDatabase
from benchmarks.common import (
    APP_ROLE,
    asgi_call,
    create_app_role,
    http_scope,
    interleave,
    machine,
    median,
    peak_rss_mb,
    postgres,
)

NOISY = "noisy"
QUIET = [f"quiet{n}" for n in range(1, 10)]
ROWS = 100
POOL = 6
ROUNDS, REQUESTS = 7, 500  # the cost: sequential requests per round and contender
PER_TENANT = 200  # the neighbours: requests each of the nine sends
FLOODERS = 12  # the flooder's requests in flight at once
SLEEP = 0.2  # seconds each of them sleeps in the server

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("name", String),
)


def _strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=metadata)


async def _set_up(admin_url: URL) -> None:
    engine = create_async_engine(admin_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.run_sync(metadata.create_all)
        await _strategy().install(conn)
        rows = [
            {"tenant_id": t, "id": i, "name": f"{t}-{i}"}
            for t in [NOISY, *QUIET]
            for i in range(1, ROWS + 1)
        ]
        await conn.execute(insert(items), rows)
        await conn.execute(
            text(f'REVOKE TEMPORARY ON DATABASE "{admin_url.database}" FROM PUBLIC, {APP_ROLE}')
        )
    await engine.dispose()


def _app(app_url: URL, shares: FairShares | None) -> FastAPI:
    database = TenantDatabase(
        app_url,
        _strategy(),
        engine_options={"pool_size": POOL, "max_overflow": 0, "pool_timeout": 2.0},
        shares=shares,
    )
    app = FastAPI()
    store = InMemoryTenantStore([Tenant(t) for t in [NOISY, *QUIET]])
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    setup_tenancy(app, database=database)
    session_dependency = Annotated[AsyncSession, Depends(tenant_session)]

    @app.get("/items/{item_id}")
    async def item(item_id: int, session: session_dependency) -> Any:
        row = (await session.execute(select(items.c.name).where(items.c.id == item_id))).first()
        return None if row is None else row.name

    @app.get("/slow")
    async def slow(session: session_dependency) -> int:
        await session.execute(text(f"SELECT pg_sleep({SLEEP})"))
        return 0

    return app


@asynccontextmanager
async def _served(app: FastAPI) -> AsyncIterator[None]:
    async with app.router.lifespan_context(app):
        yield


async def _sequential(app: FastAPI, count: int) -> None:
    for i in range(count):
        status = await asgi_call(app, http_scope(f"/items/{i % ROWS + 1}", QUIET[0]))
        assert status == 200, status


async def cost(app_url: URL) -> dict[str, object]:
    apps = {
        "plain": _app(app_url, None),
        "shares": _app(app_url, FairShares(connections=2, timeout_attribute=None)),
        "shares_and_timeout": _app(app_url, FairShares(connections=2, statement_timeout=5000)),
    }
    async with _served(apps["plain"]), _served(apps["shares"]), _served(apps["shares_and_timeout"]):
        for app in apps.values():
            await _sequential(app, 100)
        runs = {name: (lambda app=app: _sequential(app, REQUESTS)) for name, app in apps.items()}
        times = await interleave(ROUNDS, runs)
    rps = {name: REQUESTS / median(values) for name, values in times.items()}
    result: dict[str, object] = {f"{name}_rps": round(value) for name, value in rps.items()}
    for name in ("shares", "shares_and_timeout"):
        result[f"{name}_ratio"] = round(rps[name] / rps["plain"], 3)
        result[f"{name}_added_us"] = round((1 / rps[name] - 1 / rps["plain"]) * 1e6, 1)
    return result


async def neighbours(app_url: URL, *, flood: bool, shares: FairShares | None) -> dict[str, Any]:
    app = _app(app_url, shares)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    flood_statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def quiet(tenant_id: str) -> None:
        for i in range(PER_TENANT):
            start = time.perf_counter()
            status = await asgi_call(app, http_scope(f"/items/{i % ROWS + 1}", tenant_id))
            latencies.append(time.perf_counter() - start)
            statuses[status] += 1

    async def flooder() -> None:
        while not stop.is_set():
            flood_statuses[await asgi_call(app, http_scope("/slow", NOISY))] += 1

    async with _served(app):
        await asyncio.gather(*(asgi_call(app, http_scope("/items/1", t)) for t in QUIET))
        flooders = [asyncio.create_task(flooder()) for _ in range(FLOODERS if flood else 0)]
        if flood:
            await asyncio.sleep(SLEEP / 2)  # let the flood take what it can first
        await asyncio.gather(*(quiet(t) for t in QUIET))
        stop.set()
        await asyncio.gather(*flooders)
    latencies.sort()
    return {
        "nine_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "nine_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "nine_statuses": dict(statuses),
        "flooder_statuses": dict(flood_statuses),
    }


async def main() -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        await _set_up(admin_url)
        per_request = await cost(app_url)

        def fair() -> FairShares:
            return FairShares(connections=2, wait=0.05)

        calm = await neighbours(app_url, flood=False, shares=fair())
        flooded = await neighbours(app_url, flood=True, shares=fair())
        unshared = await neighbours(app_url, flood=True, shares=None)
    return {
        "benchmark": "fair_shares",
        "endpoint": "GET /items/{id}",
        "pool": {"pool_size": POOL, "max_overflow": 0, "share": 2, "wait_s": 0.05},
        "cost": {"rounds": ROUNDS, "requests_per_round": REQUESTS, **per_request},
        "neighbours": {
            "requests_per_tenant": PER_TENANT,
            "flood_in_flight": FLOODERS,
            "flood_sleep_s": SLEEP,
            "no_flood": calm,
            "flood_with_shares": flooded,
            "flood_without_shares": unshared,
            "p99_ratio_with_shares": round(flooded["nine_p99_ms"] / calm["nine_p99_ms"], 2),
        },
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
