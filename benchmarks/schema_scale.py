"""Schema scale: request latency with 1,000 tenant schemas against 10 (SchemaPerTenant).

Two databases on one server: one holds 10 tenant schemas, the other 1,000, each schema with the
same ``items`` table of ITEMS rows. GET /items/{id} through TenancyMiddleware + tenant_session,
sequential in-process requests cycling round-robin over every tenant of the database, so the
1,000-schema side touches 1,000 schemas per cycle (PostgreSQL's per-backend catalogue caches,
re-planning on every search_path change, the strategy's existence cache). Interleaved rounds;
round trips per request are counted in a separate pass through a loopback proxy.

Set-up: the 10 schemas are made with ``SchemaPerTenant.create_tenant_schema()``; the 1,000 with
the same DDL in bulk, one ``DO`` block in one transaction (the helper costs several round trips
per schema). Both are timed and reported. Prints one JSON object; target ratio <= 1.2.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sqlalchemy import MetaData, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant
from asgi_tenancy.sqlalchemy import SchemaPerTenant, TenantDatabase
from benchmarks.common import (
    APP_ROLE,
    asgi_call,
    create_app_role,
    interleave,
    machine,
    median,
    peak_rss_mb,
    postgres,
)
from benchmarks.strategies import ITEMS, item_scope, own_items, own_metadata, scoped_app
from benchmarks.wire import WireProxy

SIZES = (10, 1000)
ROUNDS, REQUESTS = 5, 1000  # a round visits each of the 1,000 tenants once
PREFIX = "bench_schemas_"

_BULK = f"""
DO $bench$
BEGIN
  FOR i IN 0 .. :last LOOP
    EXECUTE format('CREATE SCHEMA %I', 'tenant_s' || lpad(i::text, 4, '0'));
    EXECUTE format('COMMENT ON SCHEMA %I IS %L', 'tenant_s' || lpad(i::text, 4, '0'),
                   'asgi-tenancy tenant s' || lpad(i::text, 4, '0'));
    EXECUTE format('CREATE TABLE %I.items (id integer PRIMARY KEY, name varchar)',
                   'tenant_s' || lpad(i::text, 4, '0'));
    EXECUTE format('INSERT INTO %I.items SELECT g, %L || g FROM generate_series(1, {ITEMS}) g',
                   'tenant_s' || lpad(i::text, 4, '0'), 's' || lpad(i::text, 4, '0') || '-');
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO {APP_ROLE}', 'tenant_s' || lpad(i::text, 4, '0'));
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I'
                   ' TO {APP_ROLE}', 'tenant_s' || lpad(i::text, 4, '0'));
  END LOOP;
END
$bench$
"""


def _tenant(i: int) -> Tenant:
    return Tenant(f"s{i:04d}")


def _strategy() -> SchemaPerTenant:
    return SchemaPerTenant(metadata=own_metadata)


async def _create_database(admin_url: URL, size: int) -> float:
    """A database holding ``size`` tenant schemas; returns the seconds the schemas took."""
    name = f"{PREFIX}{size}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    engine = create_async_engine(admin_url.set(database=name))
    started = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC'))
        if size <= 10:
            strategy = _strategy()
            for i in range(size):
                await strategy.create_tenant_schema(conn, _tenant(i), APP_ROLE)
                table = own_items.to_metadata(MetaData(), schema=f"tenant_s{i:04d}")
                rows = [{"id": n, "name": f"s{i:04d}-{n}"} for n in range(1, ITEMS + 1)]
                await conn.execute(insert(table), rows)
        else:
            # The literal bound is inlined: a DO block takes no parameters.
            await conn.execute(text(_BULK.replace(":last", str(size - 1))))
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return round(elapsed, 2)


def _app(url: URL, size: int, strategy: SchemaPerTenant) -> Any:
    database = TenantDatabase(url.set(database=f"{PREFIX}{size}"), strategy)
    return scoped_app(
        database,
        lambda item: select(own_items).where(own_items.c.id == item),
        [_tenant(i) for i in range(size)],
    )


async def _requests(app: Any, size: int, n: int) -> None:
    for i in range(n):
        status = await asgi_call(app, item_scope(_tenant(i % size).id, (i % ITEMS) + 1))
        assert status == 200, status


def _target(url: URL) -> dict[str, Any]:
    socket_dir = url.query.get("host")
    if socket_dir:
        return {"unix_path": f"{socket_dir}/.s.PGSQL.{url.port or 5432}"}
    return {"host": url.host, "port": url.port or 5432}


async def main() -> dict[str, object]:
    set_up: dict[str, float] = {}
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        for size in SIZES:
            set_up[f"{size}_schemas_s"] = await _create_database(admin_url, size)
        strategies = {size: _strategy() for size in SIZES}
        apps = {size: _app(app_url, size, strategies[size]) for size in SIZES}
        runs = {
            str(size): (lambda size=size: _requests(apps[size], size, REQUESTS)) for size in SIZES
        }
        async with (
            apps[10].router.lifespan_context(apps[10]),
            apps[1000].router.lifespan_context(apps[1000]),
        ):
            await interleave(1, runs)  # warm-up: every tenant's schema checked once
            times = await interleave(ROUNDS, runs)

        # Round trips: the same strategies (their existence caches are warm) on new engines.
        trips: dict[str, float] = {}
        async with WireProxy(**_target(app_url)) as proxy:
            proxied = app_url.set(host="127.0.0.1", port=proxy.port, query={})
            for size in SIZES:
                app = _app(proxied, size, strategies[size])
                async with app.router.lifespan_context(app):
                    await _requests(app, size, 50)
                    before = proxy.counter.round_trips
                    await _requests(app, size, REQUESTS)
                    trips[str(size)] = (proxy.counter.round_trips - before) / REQUESTS

        admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            for size in SIZES:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{PREFIX}{size}" WITH (FORCE)'))
        await admin.dispose()

    latency = {size: median(times[str(size)]) / REQUESTS * 1e6 for size in SIZES}
    return {
        "benchmark": "schema_scale",
        "endpoint": "GET /items/{id}",
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "latency_us_10_schemas": round(latency[10], 1),
        "latency_us_1000_schemas": round(latency[1000], 1),
        "ratio_1000_vs_10": round(latency[1000] / latency[10], 3),
        "target_ratio_max": 1.2,
        "round_trips_per_request": trips,
        "set_up_s": set_up,
        "set_up_method": {
            "10": "SchemaPerTenant.create_tenant_schema()",
            "1000": "one DO block of plain DDL in one transaction",
        },
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
