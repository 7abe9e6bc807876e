"""arq: jobs run as the tenant whose request enqueued them.

Run a worker with ``arq examples.jobs.arq_app.WorkerSettings``.
"""

from __future__ import annotations

import os
from typing import Any

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from sqlalchemy import func, select

from asgi_tenancy import current_tenant
from asgi_tenancy.arq import JobTenancy
from examples.jobs.database import Invoice, ready, store

tenancy = JobTenancy(store=store, keys=[os.environ["TENANCY_SNAPSHOT_KEY"]])


@tenancy.job
async def record_invoice(ctx: dict[str, Any], number: int, total: int) -> str:
    db = await ready()
    async with db.session() as session:
        session.add(Invoice(number=number, total=total))
        await session.commit()
    return current_tenant().id


@tenancy.central_job(reason="billing report across tenants")
async def count_invoices_of_every_tenant(ctx: dict[str, Any]) -> dict[str, int]:
    db = await ready()
    async with db.admin_session() as session:
        rows = await session.execute(
            select(Invoice.tenant_id, func.count()).group_by(Invoice.tenant_id)
        )
        return {tenant: count for tenant, count in rows}


class WorkerSettings:
    functions = (record_invoice, count_invoices_of_every_tenant)
    redis_settings = RedisSettings.from_dsn(os.environ["REDIS_URL"])
    job_serializer = tenancy.job_serializer  # the worker enqueues too (retries, follow-ups)


async def connect() -> ArqRedis:
    """The producers' pool: the same serializer, so jobs carry the scope they were sent from."""
    return await create_pool(WorkerSettings.redis_settings, job_serializer=tenancy.job_serializer)


async def bill(redis: ArqRedis, number: int, total: int) -> Any:
    """Call it inside a tenant scope (a request handler)."""
    return await redis.enqueue_job("record_invoice", number, total)
