"""Database per tenant: 200 tenant databases behind an engine cap of 20, round-robin traffic.

GET /items/{id} through TenancyMiddleware + tenant_session, CONCURRENCY requests in flight.
Interleaved rounds of two traffic patterns on ONE DatabasePerTenant (so one cap covers both):
``all`` cycles over the 200 tenants (every request needs an engine the LRU cache evicted),
``hot`` cycles over 20 tenants (they all fit: no eviction once warm), the baseline.

Connections are counted three ways, and none may ever exceed the cap:
- on the server: a task polls ``pg_stat_activity`` (backends in tenant databases) all run long;
- in the client: SQLAlchemy pool ``connect`` / ``close`` events, open connections at any time;
- the cache's own counters: engines held (``len(cache)``), engines created, evictions.

Set-up: one template database prepared once, then ``CREATE DATABASE ... TEMPLATE`` 200 times
(timed and reported apart). On the throwaway server (no ``DATABASE_URL``) fsync is turned
off first, as in the test suite: durability buys nothing for scratch databases.
Prints one JSON object; target: peak connections never above the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import Pool

from asgi_tenancy import Tenant
from asgi_tenancy.sqlalchemy import DatabasePerTenant, TenantDatabase
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
from benchmarks.strategies import ITEMS, item_scope, own_items, scoped_app

TENANTS, HOT, MAX_ENGINES, POOL_SIZE = 200, 20, 20, 1
MAX_CONNECTIONS = MAX_ENGINES * POOL_SIZE
CONCURRENCY, ROUNDS, REQUESTS = 24, 3, 200  # a round of `all` visits each tenant once
ACQUIRE_TIMEOUT = 10.0
PREFIX = "bench_dpt_"
TEMPLATE = f"{PREFIX}template"
CREATE_WORKERS = 4


def _name(i: int) -> str:
    return f"{PREFIX}{i:03d}"


class ClientConnections:
    """Open DBAPI connections to tenant databases in this process, and the most at once."""

    def __init__(self) -> None:
        self._open: set[int] = set()
        self.peak = 0

    def _connected(self, dbapi_connection: Any, record: Any) -> None:
        # asyncpg keeps the database it connected to in its (private) connection parameters.
        params = getattr(dbapi_connection.driver_connection, "_params", None)
        if str(getattr(params, "database", "")).startswith(PREFIX):
            self._open.add(id(dbapi_connection))
            self.peak = max(self.peak, len(self._open))

    def _closed(self, dbapi_connection: Any, *args: Any) -> None:
        self._open.discard(id(dbapi_connection))

    def install(self) -> None:
        event.listen(Pool, "connect", self._connected)
        event.listen(Pool, "close", self._closed)
        event.listen(Pool, "close_detached", self._closed)

    def remove(self) -> None:
        event.remove(Pool, "connect", self._connected)
        event.remove(Pool, "close", self._closed)
        event.remove(Pool, "close_detached", self._closed)


async def _set_up(admin_url: URL) -> dict[str, float]:
    """The template, then 200 copies; returns the seconds each step took."""
    started = time.perf_counter()
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        if not os.environ.get("DATABASE_URL"):
            await conn.execute(text("ALTER SYSTEM SET fsync = off"))
            await conn.execute(text("ALTER SYSTEM SET full_page_writes = off"))
            await conn.execute(text("SELECT pg_reload_conf()"))
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)'))
        await conn.execute(text(f'CREATE DATABASE "{TEMPLATE}"'))
    await admin.dispose()
    template = create_async_engine(admin_url.set(database=TEMPLATE))
    async with template.begin() as conn:
        await conn.execute(text("CREATE TABLE items (id integer PRIMARY KEY, name text)"))
        await conn.execute(
            text("INSERT INTO items SELECT g, 'item-' || g FROM generate_series(1, :n) g"),
            {"n": ITEMS},
        )
        await conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {APP_ROLE}"))
    await template.dispose()  # a template must have no connections while it is copied
    prepared = time.perf_counter()

    async def worker(names: list[str]) -> None:
        engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            for name in names:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                await conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"'))
        await engine.dispose()

    names = [_name(i) for i in range(TENANTS)]
    await asyncio.gather(*(worker(names[k::CREATE_WORKERS]) for k in range(CREATE_WORKERS)))
    done = time.perf_counter()
    return {
        "template_s": round(prepared - started, 2),
        "create_200_databases_s": round(done - prepared, 2),
    }


async def _tear_down(admin_url: URL) -> float | str:
    """Drop the databases (CREATE_WORKERS at a time); the throwaway server is deleted whole."""
    if not os.environ.get("DATABASE_URL"):
        return "skipped: the throwaway server is deleted"
    started = time.perf_counter()

    async def worker(names: list[str]) -> None:
        engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            for name in names:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await engine.dispose()

    names = [_name(i) for i in range(TENANTS)]
    await asyncio.gather(*(worker(names[k::CREATE_WORKERS]) for k in range(CREATE_WORKERS)))
    await worker([TEMPLATE])
    return round(time.perf_counter() - started, 2)


class ServerConnections:
    """Polls pg_stat_activity for backends in tenant databases; keeps the most seen at once."""

    def __init__(self, admin_url: URL) -> None:
        self._engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.peak = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        query = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname LIKE :pattern AND datname <> :template"
        )
        async with self._engine.connect() as conn:
            while True:
                count = await conn.scalar(
                    query, {"pattern": PREFIX.replace("_", "\\_") + "%", "template": TEMPLATE}
                )
                self.samples += 1
                self.peak = max(self.peak, int(count or 0))
                await asyncio.sleep(0.002)

    async def __aenter__(self) -> ServerConnections:
        self._task = asyncio.ensure_future(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._engine.dispose()


async def _traffic(app: Any, tenants: list[str], n: int, statuses: dict[int, int]) -> None:
    """``n`` requests over ``tenants`` in round-robin order, CONCURRENCY at a time."""
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            status = await asgi_call(app, item_scope(tenants[i % len(tenants)], (i % ITEMS) + 1))
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def main() -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        set_up = await _set_up(admin_url)
        clients = ClientConnections()
        clients.install()
        try:
            strategy = DatabasePerTenant(
                max_engines=MAX_ENGINES,
                max_connections=MAX_CONNECTIONS,
                pool_size_per_engine=POOL_SIZE,
                acquire_timeout=ACQUIRE_TIMEOUT,
            )
            database = TenantDatabase(app_url, strategy)
            tenants = [
                Tenant(
                    f"t{i:03d}",
                    attributes={
                        "database_url": app_url.set(database=_name(i)).render_as_string(
                            hide_password=False
                        )
                    },
                )
                for i in range(TENANTS)
            ]
            app = scoped_app(
                database, lambda item: select(own_items).where(own_items.c.id == item), tenants
            )
            ids = [t.id for t in tenants]
            statuses: dict[str, dict[int, int]] = {"all": {}, "hot": {}}
            engines_peak = 0

            def run(label: str, pool: list[str]) -> Callable[[], Awaitable[None]]:
                async def go() -> None:
                    nonlocal engines_peak
                    await _traffic(app, pool, REQUESTS, statuses[label])
                    engines_peak = max(engines_peak, len(strategy.engines))

                return go

            runs = {"hot": run("hot", ids[:HOT]), "all": run("all", ids)}
            async with app.router.lifespan_context(app), ServerConnections(admin_url) as server:
                await interleave(1, runs)  # warm-up: connect, prepare
                created_before = strategy.engines.created
                engines_at_start = len(strategy.engines)
                times = await interleave(ROUNDS, runs)
                created = strategy.engines.created - created_before
                engines_at_end = len(strategy.engines)
            # the lifespan disposed the database: every tenant engine closed
        finally:
            clients.remove()
        torn_down = await _tear_down(admin_url)

    hot_rps = REQUESTS / median(times["hot"])
    all_rps = REQUESTS / median(times["all"])
    peak = {
        "server_pg_stat_activity": server.peak,
        "client_pool_events": clients.peak,
        "cache_engines": engines_peak,
    }
    return {
        "benchmark": "database_per_tenant",
        "endpoint": "GET /items/{id}",
        "tenants": TENANTS,
        "hot_tenants": HOT,
        "max_engines": MAX_ENGINES,
        "pool_size_per_engine": POOL_SIZE,
        "max_connections": MAX_CONNECTIONS,
        "concurrency": CONCURRENCY,
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "all_rps": round(all_rps, 1),
        "hot_rps": round(hot_rps, 1),
        "ratio_all_vs_hot": round(all_rps / hot_rps, 3),
        "engines_created_in_timed_rounds": created,
        "evictions_in_timed_rounds": created - (engines_at_end - engines_at_start),
        "statuses": {k: {str(s): c for s, c in v.items()} for k, v in statuses.items()},
        "peak_connections": peak,
        "server_samples": server.samples,
        "cap_held": max(peak.values()) <= MAX_CONNECTIONS,
        "set_up_s": set_up,
        "tear_down_s": torn_down,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
