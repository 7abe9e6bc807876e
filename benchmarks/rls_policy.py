"""RLS policy cost: one tenant's rows from a 1,000,000-row table of 1,000 tenants.

Under the policy (a tenant session, explicit predicate from the ORM off: raw SQL without
WHERE) versus the same rows read with an explicit WHERE from an identical table without RLS.
Prints one JSON object; target ratio <= 1.15.
"""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import Column, Integer, MetaData, String, Table, text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from benchmarks.common import create_app_role, interleave, machine, median, peak_rss_mb, postgres

TENANTS, ROWS_PER_TENANT, ROUNDS = 1000, 1000, 30

metadata = MetaData()
Table(
    "events",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("payload", String),
)


async def main() -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        admin = create_async_engine(admin_url)
        # The baseline table is read with an explicit WHERE: declared shared, or validate()
        # refuses a reachable tenant-column table without RLS (R015), as it should.
        strategy = RowLevelSecurity(
            metadata=metadata, orm_criteria=False, shared_tables={"events_plain"}
        )
        async with admin.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS events, events_plain"))
            await conn.run_sync(metadata.create_all)
            await strategy.install(conn)
            await conn.execute(
                text(
                    "INSERT INTO events SELECT 't' || (g % :n), g, md5(g::text) "
                    "FROM generate_series(1, :total) g"
                ),
                {"n": TENANTS, "total": TENANTS * ROWS_PER_TENANT},
            )
            await conn.execute(text("CREATE TABLE events_plain (LIKE events INCLUDING ALL)"))
            await conn.execute(text("INSERT INTO events_plain SELECT * FROM events"))
            await conn.execute(text("CREATE INDEX ON events_plain (tenant_id)"))
        async with admin.connect() as conn:
            await conn.execute(text("COMMIT"))
            await conn.execute(text("VACUUM ANALYZE events"))
            await conn.execute(text("VACUUM ANALYZE events_plain"))
        await admin.dispose()

        db = TenantDatabase(app_url, strategy)
        await db.validate()
        plain = create_async_engine(app_url)
        tenant = Tenant("t42")

        async def under_policy() -> None:
            async with tenant_scope(tenant), db.session() as s:
                rows = (await s.execute(text("SELECT id, payload FROM events"))).all()
                assert len(rows) == ROWS_PER_TENANT

        async def explicit_where() -> None:
            async with plain.connect() as conn:
                rows = (
                    await conn.execute(
                        text("SELECT id, payload FROM events_plain WHERE tenant_id = :t"),
                        {"t": tenant.id},
                    )
                ).all()
                assert len(rows) == ROWS_PER_TENANT

        await interleave(3, {"policy": under_policy, "where": explicit_where})  # warm-up
        times = await interleave(ROUNDS, {"policy": under_policy, "where": explicit_where})
        await db.dispose()
        await plain.dispose()
    policy_ms, where_ms = median(times["policy"]) * 1000, median(times["where"]) * 1000
    return {
        "benchmark": "rls_policy",
        "table_rows": TENANTS * ROWS_PER_TENANT,
        "tenants": TENANTS,
        "rows_read": ROWS_PER_TENANT,
        "rounds": ROUNDS,
        "policy_ms_median": round(policy_ms, 3),
        "explicit_where_ms_median": round(where_ms, 3),
        "ratio": round(policy_ms / where_ms, 3),
        "target_ratio_max": 1.15,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
