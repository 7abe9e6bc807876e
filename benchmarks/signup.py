"""Sign-up: the time ``TenantProvisioner.create_tenant()`` takes per strategy, against plain DDL.

A tenant of an application with TABLES tables (each with a primary key, a foreign key to the
first table, an index and a server default):

- ``schema``: ``create_tenant()`` under ``SchemaPerTenant`` (registry row, schema, tables,
  marker comment, grants, one transaction), against the baseline of the same tables made in a
  fresh plain schema with ``CREATE SCHEMA`` + ``metadata.create_all`` and no library; interleaved
  rounds, SCHEMA_TENANTS of each;
- ``database``: ``create_tenant()`` under ``DatabasePerTenant`` (registry row, ``CREATE
  DATABASE``, grants, tables, activation), against ``CREATE DATABASE`` + ``create_all``;
  DATABASE_TENANTS of each;
- ``row``: ``create_tenant()`` under ``RowLevelSecurity``: one registry row.

The server keeps its durability settings (``fsync`` is reported): a sign-up commits for real.
Prints one JSON object; target: a schema tenant well under one second.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    func,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    RowLevelSecurity,
    SchemaPerTenant,
    create_tenants_table,
)
from benchmarks.common import (
    APP_ROLE,
    create_app_role,
    interleave,
    machine,
    median,
    peak_rss_mb,
    postgres,
)

TABLES = 20
SCHEMA_TENANTS, DATABASE_TENANTS, ROW_TENANTS = 30, 5, 30
CENTRAL = "bench_signup"
PREFIX = "bench_signup_"  # tenant databases of both sides
TARGET_SCHEMA_S = 1.0

app_metadata = MetaData()
for _i in range(TABLES):
    Table(
        f"t{_i:02d}",
        app_metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(100), nullable=False, index=True),
        Column("amount", Numeric(12, 2)),
        Column("created_at", DateTime(timezone=True), server_default=func.now()),
        *([Column("parent_id", ForeignKey("t00.id"))] if _i else []),
    )


def _timer(run: Callable[[int], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A contender for ``interleave``: each call creates the next tenant."""
    counter = itertools.count()
    return lambda: run(next(counter))


async def _plain_schema(engine: AsyncEngine, i: int) -> None:
    schema = f"plain_{i:03d}"
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await conn.run_sync(
            lambda sync: app_metadata.create_all(
                sync.execution_options(schema_translate_map={None: schema})
            )
        )


async def _plain_database(admin_url: URL, i: int) -> None:
    name = f"{PREFIX}plain_{i:03d}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    engine = create_async_engine(admin_url.set(database=name), poolclass=NullPool)
    async with engine.begin() as conn:
        await conn.run_sync(app_metadata.create_all)
    await engine.dispose()


async def _set_up(admin_url: URL) -> None:
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await _drop_all(conn)
        await conn.execute(text(f'CREATE DATABASE "{CENTRAL}"'))
    await admin.dispose()
    central = create_async_engine(admin_url.set(database=CENTRAL))
    async with central.begin() as conn:
        await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{CENTRAL}" FROM PUBLIC'))
    await create_tenants_table(central)
    await central.dispose()


async def _drop_all(conn: AsyncConnection) -> None:
    """Every database of this benchmark, the central one included (left by an earlier run)."""
    names = await conn.scalars(
        text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": f"{CENTRAL}%"}
    )
    for name in list(names):
        await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(median(times) * 1000, 1),
        "min_ms": round(min(times) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
    }


async def main() -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        await _set_up(admin_url)
        admin = create_async_engine(admin_url.set(database=CENTRAL))
        async with admin.connect() as conn:
            fsync = await conn.scalar(text("SHOW fsync"))
        schemas = TenantProvisioner(
            admin, SchemaPerTenant(metadata=app_metadata), app_role=APP_ROLE
        )
        databases = TenantProvisioner(
            admin,
            DatabasePerTenant(),
            app_role=APP_ROLE,
            metadata=app_metadata,
            app_url=app_url,
            database_naming=f"{PREFIX}{{id}}",
        )
        rows = TenantProvisioner(admin, RowLevelSecurity(), app_role=APP_ROLE)
        plain = create_async_engine(admin_url.set(database=CENTRAL))

        async def schema_tenant(i: int) -> None:
            await schemas.create_tenant(f"s{i:03d}")

        async def database_tenant(i: int) -> None:
            await databases.create_tenant(f"d{i:03d}")

        async def row_tenant(i: int) -> None:
            await rows.create_tenant(f"r{i:03d}")

        async def plain_schema(i: int) -> None:
            await _plain_schema(plain, i)

        async def plain_database(i: int) -> None:
            await _plain_database(admin_url, i)

        # Warm-up: connections, SQLAlchemy's compiled caches, the first CREATE DATABASE.
        await schemas.create_tenant("warm")
        await _plain_schema(plain, 999)
        schema_times = await interleave(
            SCHEMA_TENANTS,
            {"schema": _timer(schema_tenant), "baseline": _timer(plain_schema)},
        )
        database_times = await interleave(
            DATABASE_TENANTS,
            {"database": _timer(database_tenant), "baseline": _timer(plain_database)},
        )
        row_times = await interleave(ROW_TENANTS, {"row": _timer(row_tenant)})
        async with admin.connect() as conn:
            registered = await conn.scalar(text("SELECT count(*) FROM public.tenants"))
        await plain.dispose()
        await admin.dispose()

        cleaner = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with cleaner.connect() as conn:
            await _drop_all(conn)
        await cleaner.dispose()

    schema_s = median(schema_times["schema"])
    database_s = median(database_times["database"])
    return {
        "benchmark": "signup",
        "tables_per_tenant": TABLES,
        "tenants": {
            "schema": SCHEMA_TENANTS,
            "database": DATABASE_TENANTS,
            "row": ROW_TENANTS,
            "registered": registered,
        },
        "schema_tenant": _summary(schema_times["schema"]),
        "schema_baseline": _summary(schema_times["baseline"]),
        "ratio_schema_vs_baseline": round(schema_s / median(schema_times["baseline"]), 3),
        "database_tenant": _summary(database_times["database"]),
        "database_baseline": _summary(database_times["baseline"]),
        "ratio_database_vs_baseline": round(database_s / median(database_times["baseline"]), 3),
        "row_tenant": _summary(row_times["row"]),
        "target_schema_s_max": TARGET_SCHEMA_S,
        "schema_within_target": schema_s < TARGET_SCHEMA_S,
        "fsync": fsync,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
