"""The Celery app of the job tests, run by a worker process of its own (``celery -A ...``).

Configured from the environment (``TENANCY_JOBS_*``) in the worker, by ``configure()`` in the
test process, which only produces. The database and the store open lazily, in the process that
runs the jobs (a prefork child, not the parent that forks it).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import (
    Tenant,
    TenantContextError,
    current_tenant,
    current_tenant_or_none,
)
from asgi_tenancy.celery import TenantTask, run_async
from asgi_tenancy.context import in_central_scope
from asgi_tenancy.sqlalchemy import SqlAlchemyTenantStore, TenantDatabase
from tests.jobs.models import SNAPSHOT_KEYS, JobRow, strategy


class _Resources:
    """The worker's database and store, made on first use in the process that runs jobs."""

    def __init__(self) -> None:
        self._db: TenantDatabase | None = None
        self._store: SqlAlchemyTenantStore | None = None
        self._pid = 0

    def _make(self) -> None:
        if self._pid != os.getpid():
            url = os.environ["TENANCY_JOBS_APP_URL"]
            self._db = TenantDatabase(url, strategy(), engine_options={"pool_size": 5})
            self._store = SqlAlchemyTenantStore(create_async_engine(url, pool_size=2))
            self._pid = os.getpid()

    async def database(self) -> TenantDatabase:
        self._make()
        assert self._db is not None
        if not self._db.validated:
            await self._db.validate()
        return self._db

    async def get(self, tenant_id: str) -> Tenant | None:  # the TenantStore protocol
        self._make()
        assert self._store is not None
        return await self._store.get(tenant_id)


resources = _Resources()


class Task(TenantTask):
    tenant_store = resources
    snapshot_keys = SNAPSHOT_KEYS


app = Celery("tenancy_jobs", task_cls=Task, set_as_current=False)


def configure(*, broker: str, backend: str, queue: str) -> None:
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=8,
    )


@worker_ready.connect
def _wake_the_consumer(sender: Any, **kwargs: Any) -> None:
    # Celery issue 6941: with the threads pool, acknowledgements (and so the next fetch) wait
    # for the consumer loop's next timer event, seconds away. A 20 ms timer bounds that wait.
    if "thread" in type(sender.pool).__module__:
        sender.timer.call_repeatedly(0.02, lambda: None)


if "TENANCY_JOBS_BROKER" in os.environ:
    configure(
        broker=os.environ["TENANCY_JOBS_BROKER"],
        backend=os.environ["TENANCY_JOBS_BACKEND"],
        queue=os.environ["TENANCY_JOBS_QUEUE"],
    )


def _where() -> list[int]:
    return [os.getpid(), threading.get_ident()]


async def _write(job: int, expected: str) -> None:
    db = await resources.database()
    async with db.session() as session:  # two transactions: the binding survives the commit
        session.add(JobRow(job=job, step=1, expected=expected))
        await session.commit()
        session.add(JobRow(job=job, step=2, expected=expected))
        await session.commit()


async def _data_path() -> str:
    db = await resources.database()
    try:
        async with db.session():
            return "reached"
    except TenantContextError:
        return "refused"


@app.task
def write_rows(job: int, expected: str, fail: bool = False) -> dict[str, Any]:
    """A sync body: the scope is this pool thread's, the database work on the job loop."""
    run_async(_write(job, expected))
    if fail:
        raise RuntimeError("failed after writing")
    return {"tenant": current_tenant().id, "where": _where()}


@app.task
async def write_rows_async(job: int, expected: str) -> dict[str, Any]:
    await _write(job, expected)
    return {"tenant": current_tenant().id, "where": _where()}


@app.task
def probe() -> dict[str, Any]:
    """What a job finds when it starts: no tenant and no central scope, whoever ran before."""
    tenant = current_tenant_or_none()
    return {
        "tenant": None if tenant is None else tenant.id,
        "central": in_central_scope(),
        "data": run_async(_data_path()),
        "where": _where(),
    }


@app.task(central="job tests: a central task")
def central_probe() -> dict[str, Any]:
    tenant = current_tenant_or_none()
    return {
        "tenant": None if tenant is None else tenant.id,
        "central": in_central_scope(),
        "data": run_async(_data_path()),
    }
