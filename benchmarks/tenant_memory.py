"""Memory per tenant: RSS after requests of 100 distinct tenants, of 10,000, then of 20,000.

The ``strategies`` apps (row, row_signed, query) behind a store that knows 10,000 tenants
(``CachedTenantStore``, 10,000 entries): each tenant id is requested twice, so every per-tenant
cache on the request path (store entries, binding strings, loader criteria) fills. Tenants
without rows answer 404, which still runs the whole scoped path. Prints one JSON object: the
RSS growth from 100 to 10,000 tenants and what it costs per tenant, then from 10,000 to 20,000,
where the documented cache bounds (docs/benchmarks.md, "Memory bounds") keep it flat.
``python -m benchmarks.tenant_memory [row row_signed query]``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys

from sqlalchemy.engine import URL

from asgi_tenancy import Tenant
from asgi_tenancy.sqlalchemy import TenantDatabase
from benchmarks.common import asgi_call, create_app_role, machine, peak_rss_mb, postgres
from benchmarks.strategies import SETUPS, _served, item_scope, scoped_app

COUNTS = (100, 10_000, 20_000)
NAMES = ("row", "row_signed", "query")


async def _visit(app: object, tenants: list[Tenant]) -> None:
    for _ in range(2):
        for tenant in tenants:
            status = await asgi_call(app, item_scope(tenant.id, 1))
            assert status in (200, 404), status


async def measure(name: str, admin_url: URL, app_url: URL) -> dict[str, object]:
    setup = await SETUPS[name](admin_url)
    tenants = [Tenant(f"tenant-{i:05d}") for i in range(max(COUNTS))]
    database = TenantDatabase(app_url, setup.strategy())
    app = scoped_app(database, setup.scoped, tenants)
    figures: dict[str, float] = {}
    try:
        async with _served(app):
            seen = 0
            for count in COUNTS:
                await _visit(app, tenants[seen:count])
                seen = count
                gc.collect()
                figures[f"peak_rss_mb_after_{count}_tenants"] = peak_rss_mb()
                figures[f"rss_mb_after_{count}_tenants"] = _rss_mb()
    finally:
        await database.dispose()
        if setup.teardown is not None:
            await setup.teardown(admin_url)
    low, mid, high = (figures[f"rss_mb_after_{c}_tenants"] for c in COUNTS)
    return {
        **figures,
        "growth_mb_100_to_10000": round(mid - low, 1),
        "bytes_per_tenant_100_to_10000": round((mid - low) * 1024 * 1024 / (COUNTS[1] - COUNTS[0])),
        "growth_mb_10000_to_20000": round(high - mid, 1),
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024, 1)


async def _one(name: str) -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        return await measure(name, admin_url, app_url)


def main(names: list[str]) -> dict[str, object]:
    """Each strategy in a process of its own, so that each peak is its own."""
    results: dict[str, object] = {}
    for name in names:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.tenant_memory", "--one", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(out)
    return {
        "benchmark": "tenant_memory",
        "tenant_counts": list(COUNTS),
        "results": results,
        "machine": machine(),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(asyncio.run(_one(sys.argv[2]))))
    else:
        print(json.dumps(main(sys.argv[1:] or list(NAMES)), indent=2))
