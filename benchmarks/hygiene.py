"""What session hygiene costs: a verdict per statement, a connection replaced, a tenant change.

- ``verdict``: the classifier on a cached statement text (the hot path: a dict lookup) and on a
  new one (one parse by PostgreSQL's grammar), for a typical ORM statement;
- ``replaced``: a request whose raw SQL marks its connection, so the next checkout connects
  anew, against one whose connection is reused;
- ``tenant change``: requests alternating between two tenants on one connection (the
  ``BEGIN`` message also releases advisory locks and, after an INSERT, discards sequence
  state) against the same requests all for one tenant.
Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import time

from sqlalchemy import Column, Integer, MetaData, String, Table, text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from asgi_tenancy.sqlalchemy.hygiene import Hygiene
from benchmarks.common import create_app_role, interleave, machine, median, peak_rss_mb, postgres

ROUNDS, REQUESTS = 5, 300
STATEMENT = (
    "SELECT items.tenant_id, items.id, items.body FROM items"
    " WHERE items.tenant_id = $1::VARCHAR AND items.id = $2::INTEGER"
)
metadata = MetaData()
Table(
    "items",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("body", String),
)


def _verdicts() -> dict[str, float]:
    hygiene = Hygiene({"count", "lower"})
    hygiene.effect(STATEMENT)
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        hygiene.effect(STATEMENT)
    cached = (time.perf_counter() - started) / n * 1e6
    fresh = [f"{STATEMENT} AND items.id <> {i}" for i in range(2000)]
    started = time.perf_counter()
    for sql in fresh:
        hygiene.effect(sql)
    parsed = (time.perf_counter() - started) / len(fresh) * 1e6
    return {"cached_us": round(cached, 3), "parsed_us": round(parsed, 1)}


async def main() -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        strategy = RowLevelSecurity(metadata=metadata)
        admin = create_async_engine(admin_url)
        async with admin.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS items"))
            await conn.execute(
                text(f'REVOKE TEMPORARY ON DATABASE "{admin_url.database}" FROM PUBLIC')
            )
            await conn.run_sync(metadata.create_all)
            await strategy.install(conn)
            await conn.execute(
                text(
                    "INSERT INTO items SELECT t, i, 'x' FROM unnest(ARRAY['a','b']) t,"
                    " generate_series(1, 10) i"
                )
            )
        await admin.dispose()
        db = TenantDatabase(app_url, strategy, engine_options={"pool_size": 1, "max_overflow": 0})
        await db.validate()
        a, b = Tenant("a"), Tenant("b")

        async def request(tenant: Tenant, extra: str = "SELECT 1") -> None:
            async with tenant_scope(tenant), db.session() as s:
                await s.execute(text("SELECT body FROM items WHERE id = 1"))
                await s.execute(text(extra))  # the same second statement, harmless or not

        async def same() -> None:
            for _ in range(REQUESTS):
                await request(a)

        async def alternate() -> None:
            for i in range(REQUESTS):
                await request(a if i % 2 else b)

        async def marked() -> None:
            for _ in range(REQUESTS):
                await request(a, "SET app.other = 'x'")

        await interleave(1, {"same": same, "alternate": alternate, "marked": marked})
        times = await interleave(ROUNDS, {"same": same, "alternate": alternate, "marked": marked})
        await db.dispose()
    per = {name: median(values) / REQUESTS * 1e6 for name, values in times.items()}
    return {
        "benchmark": "hygiene",
        "verdict": _verdicts(),
        "request_us_same_tenant": round(per["same"], 1),
        "request_us_alternating_tenants": round(per["alternate"], 1),
        "tenant_change_added_us": round(per["alternate"] - per["same"], 1),
        "request_us_connection_replaced": round(per["marked"], 1),
        "replacement_added_us": round(per["marked"] - per["same"], 1),
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
