"""Celery: tasks run as the tenant whose request enqueued them.

Run a worker with ``celery -A examples.jobs.celery_app worker --pool prefork`` (or threads).
"""

from __future__ import annotations

import os

from celery import Celery
from sqlalchemy import func, select

from asgi_tenancy import current_tenant
from asgi_tenancy.celery import TenantTask
from examples.jobs.database import Invoice, ready, store


class Task(TenantTask):
    tenant_store = store
    # The same keys on producers and workers: the current one first, the previous one next.
    snapshot_keys = (os.environ["TENANCY_SNAPSHOT_KEY"],)


app = Celery(
    "billing",
    broker=os.environ["REDIS_URL"],
    backend=os.environ["REDIS_URL"],
    task_cls=Task,
)


@app.task
async def record_invoice(number: int, total: int) -> str:
    """Runs as the tenant that enqueued it: the row lands in that tenant, nowhere else."""
    db = await ready()
    async with db.session() as session:
        session.add(Invoice(number=number, total=total))
        await session.commit()
    return current_tenant().id


@app.task(central="billing report across tenants")
async def count_invoices_of_every_tenant() -> dict[str, int]:
    """Central work: explicit, logged with its reason, through the admin engine."""
    db = await ready()
    async with db.admin_session() as session:
        rows = await session.execute(
            select(Invoice.tenant_id, func.count()).group_by(Invoice.tenant_id)
        )
        return {tenant: count for tenant, count in rows}


def bill(number: int, total: int) -> object:
    """Call it where a tenant scope is active (a request handler): the task carries it."""
    return record_invoice.delay(number, total)
