"""Middleware cost: a trivial FastAPI endpoint with TenancyMiddleware vs the same app without it.

In-process ASGI calls (no network, no client library), 7 interleaved rounds of 2,000 requests,
the header resolver and a cached store. Then 10,000 distinct tenants go through the cache, to
show what that costs in memory. Prints one JSON object; target ratio >= 0.95.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
)
from benchmarks.common import interleave, machine, median, peak_rss_mb

ROUNDS, REQUESTS = 7, 2000


def _app(store: CachedTenantStore | None) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    if store is not None:
        app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    return app


def _scope(tenant: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/ping",
        "raw_path": b"/ping",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tenant-id", tenant.encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("bench", 80),
    }


async def _call(app: Any, scope: dict[str, Any]) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def main() -> dict[str, object]:
    tenants = [Tenant(f"tenant-{i}") for i in range(10_000)]
    store = CachedTenantStore(InMemoryTenantStore(tenants), max_entries=10_000)
    plain, scoped = _app(None), _app(store)
    scopes = [_scope(f"tenant-{i % 10}") for i in range(REQUESTS)]

    async def run_plain() -> None:
        for scope in scopes:
            assert await _call(plain, scope) == 200

    async def run_scoped() -> None:
        for scope in scopes:
            assert await _call(scoped, scope) == 200

    await interleave(1, {"plain": run_plain, "scoped": run_scoped})  # warm-up
    times = await interleave(ROUNDS, {"plain": run_plain, "scoped": run_scoped})
    plain_rps = REQUESTS / median(times["plain"])
    scoped_rps = REQUESTS / median(times["scoped"])

    rss_before = peak_rss_mb()
    for tenant in tenants:
        assert await _call(scoped, _scope(tenant.id)) == 200
    return {
        "benchmark": "middleware",
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "baseline_rps": round(plain_rps),
        "middleware_rps": round(scoped_rps),
        "ratio": round(scoped_rps / plain_rps, 3),
        "added_us_per_request": round((1 / scoped_rps - 1 / plain_rps) * 1e6, 1),
        "target_ratio_min": 0.95,
        "cache_entries_after_10000_tenants": len(store),
        "peak_rss_mb_before_10000_tenants": rss_before,
        "peak_rss_mb_after_10000_tenants": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
