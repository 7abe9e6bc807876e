"""The tenant SQL comment's cost on the statement cache (``enable_sql_comment``).

With the comment every tenant's statements differ in text, so the driver's prepared-statement
cache (asyncpg via SQLAlchemy: 100 entries per connection by default) holds one entry per tenant
and statement. Here: one connection, 3 distinct statements per session, tenants taken in turn,
RowLevelSecurity binding as usual; with the comment against the same engine setup without it,
interleaved round by round, for 1, 10, 100 and 1,000 tenants. Times move with the machine's
load; the statements asyncpg prepares per session (counted by a connection subclass) do not.
Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.opentelemetry import enable_sql_comment
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from asgi_tenancy.sqlalchemy._asyncpg import TenancyConnection
from benchmarks.common import create_app_role, interleave, machine, median, peak_rss_mb, postgres

TENANT_COUNTS = (1, 10, 100, 1000)
SESSIONS, ROUNDS, ROWS_PER_TENANT = 400, 7, 5
CACHE_SIZE = 100  # SQLAlchemy's asyncpg dialect: prepared_statement_cache_size
STATEMENTS = (
    "SELECT payload FROM items WHERE id = :id",
    "SELECT count(*) FROM items",
    "SELECT max(id) FROM items WHERE id > :id",
)

metadata = MetaData()
Table(
    "items",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("payload", String),
)


def _counting_connection() -> type[TenancyConnection]:
    """A connection class of one engine's own that counts the statements asyncpg prepares."""

    class Counting(TenancyConnection):
        prepares = 0

        async def prepare(self, *args: Any, **kwargs: Any) -> Any:
            type(self).prepares += 1  # one Parse/Describe round trip each
            return await super().prepare(*args, **kwargs)

    return Counting


async def _prepared_on_server(db: TenantDatabase, tenant: Tenant) -> int:
    async with tenant_scope(tenant), db.session() as s:
        return int(await s.scalar(text("SELECT count(*) FROM pg_prepared_statements")) or 0)


async def main() -> dict[str, object]:
    results: dict[str, object] = {}
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        admin = create_async_engine(admin_url)
        strategy = RowLevelSecurity(metadata=metadata, orm_criteria=False)
        tenants = [Tenant(f"t{i}") for i in range(max(TENANT_COUNTS))]
        async with admin.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS items"))
            await conn.run_sync(metadata.create_all)
            await strategy.install(conn)
            await conn.execute(
                text(
                    "INSERT INTO items SELECT 't' || t, i, md5((t * 10 + i)::text) "
                    "FROM generate_series(0, :n - 1) t, generate_series(1, :rows) i"
                ),
                {"n": len(tenants), "rows": ROWS_PER_TENANT},
            )
        await admin.dispose()

        for count in TENANT_COUNTS:
            counters = {"plain": _counting_connection(), "comment": _counting_connection()}

            options = {
                name: {
                    "pool_size": 1,
                    "max_overflow": 0,
                    "connect_args": {"connection_class": counter},
                }
                for name, counter in counters.items()
            }
            plain = TenantDatabase(app_url, strategy, engine_options=options["plain"])
            commented = TenantDatabase(app_url, strategy, engine_options=options["comment"])
            enable_sql_comment(commented.engine)
            await plain.validate()
            await commented.validate()
            chosen = tenants[:count]

            def run(
                db: TenantDatabase, chosen: list[Tenant] = chosen
            ) -> Callable[[], Awaitable[None]]:
                async def sessions() -> None:
                    for i in range(SESSIONS):
                        async with tenant_scope(chosen[i % len(chosen)]), db.session() as s:
                            for sql in STATEMENTS:
                                await s.execute(text(sql), {"id": 1 + i % ROWS_PER_TENANT})

                return sessions

            contenders = {"plain": run(plain), "comment": run(commented)}
            await interleave(1, contenders)  # warm-up: caches filled as far as they go
            before = {name: counter.prepares for name, counter in counters.items()}
            times = await interleave(ROUNDS, contenders)
            prepares = {
                name: (counter.prepares - before[name]) / (ROUNDS * SESSIONS)
                for name, counter in counters.items()
            }
            plain_us = median(times["plain"]) / SESSIONS * 1e6
            comment_us = median(times["comment"]) / SESSIONS * 1e6
            results[f"tenants_{count}"] = {
                "distinct_statements": len(STATEMENTS) * count,
                "plain_us_per_session": round(plain_us, 1),
                "comment_us_per_session": round(comment_us, 1),
                "ratio": round(comment_us / plain_us, 3),
                "added_us_per_session": round(comment_us - plain_us, 1),
                "prepares_per_session_plain": round(prepares["plain"], 3),
                "prepares_per_session_comment": round(prepares["comment"], 3),
                "server_prepared_plain": await _prepared_on_server(plain, chosen[0]),
                "server_prepared_comment": await _prepared_on_server(commented, chosen[0]),
            }
            await plain.dispose()
            await commented.dispose()
    return {
        "benchmark": "sql_comment",
        "sessions_per_round": SESSIONS,
        "statements_per_session": len(STATEMENTS),
        "rounds": ROUNDS,
        "driver_cache_entries": CACHE_SIZE,
        **results,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
