"""Row tenancy on a Citus cluster: GET /items/{id} through TenancyMiddleware + tenant_session
with ``RowLevelSecurity(citus=True)``, against the same endpoint in plain FastAPI with an
unscoped AsyncSession, both on the same cluster.

Both tables are distributed by ``tenant_id`` (the scoped one with the policy, the baseline's
without, filtered by hand), so both routes reach one shard on one worker: the ratio is what
the library costs on a cluster (the ``SET LOCAL`` message of its own, the policy on the
worker), not what distribution costs.

- row_citus: the endpoint reads through a mapped class, so the ORM predicate routes it.
- row_citus_core_table: the same read on the bare ``Table``: no mapper, no ORM predicate, so
  Citus sends it to every shard and the policy filters there (right rows, at a price).

Requests are in-process ASGI calls, interleaved rounds; round trips per request are counted
between the app and the coordinator through a loopback proxy in a separate pass. Prints one
JSON object.

Then ``move_100k``: one tenant of 100,000 rows (the other tenant's rows beside it) moved to
the other worker with ``move_tenant``: the seconds to isolate it and to move it. And
``schema_move_100k``: a schema-mode tenant (``SchemaPerTenant(citus=True)``, a distributed
schema) of 100,000 rows moved to the other worker with ``citus_schema_move``
(``SchemaPlacement.move``): the seconds of the copy and of the whole move (fingerprints before
and after included).

``TENANCY_CITUS_URL=postgresql://postgres@127.0.0.1:9700/postgres python -m benchmarks.citus``
(a superuser URL of the coordinator: ``bash ../shared/citus/setup.sh``).
"""

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import registry
from sqlalchemy.sql import Select

from asgi_tenancy import Tenant
from asgi_tenancy.sqlalchemy import (
    RowLevelSecurity,
    SchemaPerTenant,
    TenantDatabase,
    tenants_table,
)
from asgi_tenancy.sqlalchemy.citus import move_tenant
from asgi_tenancy.sqlalchemy.placement import PlacementContext
from benchmarks.common import (
    APP_ROLE,
    asgi_call,
    create_app_role,
    machine,
    paired_figures,
    paired_rounds,
    peak_rss_mb,
    round_trips,
)
from benchmarks.strategies import _served, baseline_app, item_scope, scoped_app
from benchmarks.wire import WireProxy

ROUNDS, REQUESTS, WARM_UP, COUNTED = 9, 200, 150, 150
ITEMS, TENANTS = 100, ("acme", "globex")

metadata = MetaData()
items = Table(
    "bench_citus_items",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("name", String),
)
plain_items = items.to_metadata(MetaData(), name="bench_citus_items_plain")

schema_metadata = MetaData()  # the schema-mode mover's one table
Table(
    "bench_citus_notes",
    schema_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", String),
)


class BenchItem:
    id: int
    name: str


registry().map_imperatively(BenchItem, items)

SCOPED: dict[str, Callable[[int], Select[Any]]] = {
    "row_citus": lambda item: select(BenchItem.id, BenchItem.name).where(BenchItem.id == item),
    "row_citus_core_table": lambda item: select(items).where(items.c.id == item),
}


def _strategy() -> RowLevelSecurity:
    return RowLevelSecurity(
        metadata=metadata, shared_tables={"bench_citus_items_plain"}, citus=True
    )


async def _set_up(admin_url: URL) -> None:
    rows = [
        {"tenant_id": t, "id": i, "name": f"{t}-{i}"} for t in TENANTS for i in range(1, ITEMS + 1)
    ]
    admin = create_async_engine(admin_url)
    async with admin.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS bench_citus_items_plain, bench_citus_items"))
        await conn.execute(
            text(f'REVOKE TEMPORARY ON DATABASE "{admin_url.database}" FROM PUBLIC, {APP_ROLE}')
        )
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(plain_items.metadata.create_all)
        await _strategy().install(conn)  # distributes bench_citus_items, adds the policy
        await conn.execute(
            text("SELECT create_distributed_table('bench_citus_items_plain', 'tenant_id')")
        )
        await conn.execute(
            text(f"GRANT SELECT ON bench_citus_items, bench_citus_items_plain TO {APP_ROLE}")
        )
        await conn.execute(insert(items), rows)
        await conn.execute(insert(plain_items), rows)
    await admin.dispose()


async def _tear_down(admin_url: URL) -> None:
    admin = create_async_engine(admin_url)
    async with admin.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS bench_citus_items_plain, bench_citus_items"))
    await admin.dispose()


async def _requests(app: object, n: int) -> None:
    for i in range(n):
        status = await asgi_call(app, item_scope(TENANTS[i % 2], (i % ITEMS) + 1))
        assert status == 200, status


def _apps(
    url: URL, scoped_query: Callable[[int], Select[Any]]
) -> tuple[AsyncEngine, object, object]:
    engine = create_async_engine(url)
    database = TenantDatabase(url, _strategy())
    plain = baseline_app(
        engine,
        lambda tenant, item: select(plain_items).where(
            plain_items.c.tenant_id == tenant, plain_items.c.id == item
        ),
    )
    scoped = scoped_app(database, scoped_query, [Tenant(t) for t in TENANTS])
    return engine, plain, scoped


async def measure(admin_url: URL, app_url: URL, name: str) -> dict[str, object]:
    await _set_up(admin_url)
    try:
        engine, plain, scoped = _apps(app_url, SCOPED[name])
        async with _served(scoped):  # type: ignore[arg-type]
            times = await paired_rounds(
                plain, scoped, _requests, rounds=ROUNDS, per_round=REQUESTS, warm_up=WARM_UP
            )
        await engine.dispose()

        async with WireProxy(host=app_url.host, port=app_url.port or 5432) as proxy:
            counted_engine, counted_plain, counted_scoped = _apps(
                app_url.set(host="127.0.0.1", port=proxy.port), SCOPED[name]
            )
            apps = {"baseline": counted_plain, "scoped": counted_scoped}
            trips = await round_trips(proxy.counter, apps, _requests, _served, COUNTED)
            await counted_engine.dispose()
    finally:
        await _tear_down(admin_url)
    return {**paired_figures(times, REQUESTS), "round_trips_per_request": trips}


MOVE_ROWS = 100_000


async def measure_move(admin_url: URL) -> dict[str, object]:
    """Isolate and move one tenant of ``MOVE_ROWS`` rows; the seconds of each step."""
    await _set_up(admin_url)
    admin = create_async_engine(admin_url)
    try:
        async with admin.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO bench_citus_items SELECT 'mover', g, 'mover-' || g"
                    " FROM generate_series(1, :n) g"
                ),
                {"n": MOVE_ROWS},
            )
        async with admin.connect() as conn:
            here = await conn.scalar(
                text(
                    "SELECT nodename || ':' || nodeport FROM pg_dist_shard_placement WHERE shardid"
                    " = get_shard_id_for_distribution_column('bench_citus_items', 'mover')"
                )
            )
            nodes = (
                await conn.execute(
                    text(
                        "SELECT node_name || ':' || node_port FROM citus_get_active_worker_nodes()"
                    )
                )
            ).scalars()
            target = next(n for n in nodes if n != here)
        marks: list[float] = []
        moved = await move_tenant(
            admin,
            _strategy(),
            "mover",
            target,
            progress=lambda _: marks.append(time.perf_counter()),
        )
    finally:
        await admin.dispose()
        await _tear_down(admin_url)
    return {
        "rows": MOVE_ROWS,
        "isolate_s": round(marks[1] - marks[0], 2),
        "move_s": round(marks[2] - marks[1], 2),
        "total_s": moved.seconds,
        "rows_after": dict(moved.rows_after),
        "checksums_match": moved.checksums_match,
    }


SCHEMA_MOVER = "bench_citus_schema_mover"


async def measure_schema_move(admin_url: URL) -> dict[str, object]:
    """Move one distributed tenant schema of ``MOVE_ROWS`` rows; the seconds it took."""
    strategy = SchemaPerTenant(
        metadata=schema_metadata, naming="bench_citus_schema_{id}", shared_schema=None, citus=True
    )
    tenant = Tenant("mover")
    admin = create_async_engine(admin_url)
    drop = text(f"DROP SCHEMA IF EXISTS {SCHEMA_MOVER} CASCADE")
    try:
        async with admin.begin() as conn:
            await conn.execute(drop)
            await strategy.create_tenant_schema(conn, tenant, APP_ROLE)
            await conn.execute(
                text(
                    f"INSERT INTO {SCHEMA_MOVER}.bench_citus_notes"
                    " SELECT g, 'mover-' || g FROM generate_series(1, :n) g"
                ),
                {"n": MOVE_ROWS},
            )
        async with admin.connect() as conn:
            here = await conn.scalar(
                text(
                    "SELECT nodename || ':' || nodeport FROM pg_dist_shard_placement WHERE shardid"
                    " = (SELECT shardid FROM pg_dist_shard"
                    f" WHERE logicalrelid = '{SCHEMA_MOVER}.bench_citus_notes'::regclass)"
                )
            )
            nodes = (
                await conn.execute(
                    text(
                        "SELECT node_name || ':' || node_port FROM citus_get_active_worker_nodes()"
                    )
                )
            ).scalars()
            target = next(n for n in nodes if n != here)
        context = PlacementContext(admin_engine=admin, app_role=APP_ROLE, registry=tenants_table())
        marks: list[float] = []
        moved = await strategy.placement.move(
            context, tenant, target, progress=lambda _: marks.append(time.perf_counter())
        )
    finally:
        async with admin.begin() as conn:
            await conn.execute(drop)
        await admin.dispose()
    return {
        "rows": MOVE_ROWS,
        "move_s": round(marks[1] - marks[0], 2),
        "total_s": moved.seconds,
        "rows_after": dict(moved.rows_after),
        "checksums_match": moved.checksums_match,
    }


async def main() -> dict[str, object]:
    url = os.environ.get("TENANCY_CITUS_URL")
    if not url:
        raise SystemExit("TENANCY_CITUS_URL is not set: bash ../shared/citus/setup.sh")
    admin_url = make_url(url).set(drivername="postgresql+asyncpg")
    app_url = await create_app_role(admin_url)
    admin = create_async_engine(admin_url)
    async with admin.connect() as conn:
        version = await conn.scalar(text("SELECT citus_version()"))
        workers = await conn.scalar(text("SELECT count(*) FROM citus_get_active_worker_nodes()"))
    await admin.dispose()
    return {
        "benchmark": "citus",
        "endpoint": "GET /items/{id}",
        "cluster": {"citus": str(version).split(" on ")[0], "workers": workers},
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "results": {name: await measure(admin_url, app_url, name) for name in SCOPED},
        "move_100k": await measure_move(admin_url),
        "schema_move_100k": await measure_schema_move(admin_url),
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
