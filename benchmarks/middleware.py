"""Middleware cost: a trivial FastAPI endpoint with TenancyMiddleware vs the same app without it.

In-process ASGI calls (no network, no client library), 7 interleaved rounds of 2,000 requests,
the header resolver and a cached store: the added µs per request is the middleware's own cost
(target: at most 6 µs). Then the same two apps served by uvicorn (one worker each, in
subprocesses) and called over HTTP with httpx, keep-alive, 7 rounds of 1,000: the ratio a
client sees (target >= 0.95), which only means something with an HTTP client in the loop.
Then 10,000 distinct tenants go through the cache, to show what that costs in memory. Prints
one JSON object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
)
from benchmarks.common import (
    asgi_call,
    compare_over_http,
    http_scope,
    interleave,
    machine,
    median,
    peak_rss_mb,
    uvicorn_app,
)

ROUNDS, REQUESTS = 7, 2000
HTTP_REQUESTS = 1000
_HTTP_TENANTS = [Tenant(f"tenant-{i}") for i in range(10)]
_PROBE = {"x-tenant-id": "tenant-0"}


def _app(store: CachedTenantStore | None) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    if store is not None:
        app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    return app


def plain_app() -> FastAPI:
    """For ``uvicorn --factory``: the app without the middleware."""
    return _app(None)


def tenancy_app() -> FastAPI:
    """For ``uvicorn --factory``: the app with the middleware and a cached store."""
    return _app(CachedTenantStore(InMemoryTenantStore(_HTTP_TENANTS)))


def _calls(client: httpx.AsyncClient) -> Callable[[], Awaitable[None]]:
    async def go() -> None:
        for i in range(HTTP_REQUESTS):
            tenant = {"x-tenant-id": f"tenant-{i % 10}"}
            assert (await client.get("/ping", headers=tenant)).status_code == 200

    return go


async def _over_http() -> dict[str, object]:
    with (
        uvicorn_app("benchmarks.middleware:plain_app", "/ping", _PROBE) as plain,
        uvicorn_app("benchmarks.middleware:tenancy_app", "/ping", _PROBE) as scoped,
    ):
        return await compare_over_http(
            plain, scoped, _calls, ROUNDS, HTTP_REQUESTS, label="middleware"
        )


async def main() -> dict[str, object]:
    tenants = [Tenant(f"tenant-{i}") for i in range(10_000)]
    store = CachedTenantStore(InMemoryTenantStore(tenants), max_entries=10_000)
    plain, scoped = _app(None), _app(store)
    scopes = [http_scope("/ping", f"tenant-{i % 10}") for i in range(REQUESTS)]

    async def run_plain() -> None:
        for scope in scopes:
            assert await asgi_call(plain, scope) == 200

    async def run_scoped() -> None:
        for scope in scopes:
            assert await asgi_call(scoped, scope) == 200

    await interleave(1, {"plain": run_plain, "scoped": run_scoped})  # warm-up
    times = await interleave(ROUNDS, {"plain": run_plain, "scoped": run_scoped})
    plain_rps = REQUESTS / median(times["plain"])
    scoped_rps = REQUESTS / median(times["scoped"])

    rss_before = peak_rss_mb()
    for tenant in tenants:
        assert await asgi_call(scoped, http_scope("/ping", tenant.id)) == 200
    return {
        "benchmark": "middleware",
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "baseline_rps": round(plain_rps),
        "middleware_rps": round(scoped_rps),
        "ratio": round(scoped_rps / plain_rps, 3),
        "added_us_per_request": round((1 / scoped_rps - 1 / plain_rps) * 1e6, 1),
        "target_added_us_max": 6,
        "over_http": await _over_http(),
        "target_over_http_ratio_min": 0.95,
        "cache_entries_after_10000_tenants": len(store),
        "peak_rss_mb_before_10000_tenants": rss_before,
        "peak_rss_mb_after_10000_tenants": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
