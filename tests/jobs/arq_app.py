"""The arq jobs of the job tests, run by an in-process worker (``arq.worker.Worker``, burst mode).

The database and the store open in the worker's ``on_startup`` and close in ``on_shutdown``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import (
    Tenant,
    TenantContextError,
    current_tenant,
    current_tenant_or_none,
)
from asgi_tenancy.arq import JobTenancy
from asgi_tenancy.context import in_central_scope
from asgi_tenancy.sqlalchemy import SqlAlchemyTenantStore, TenantDatabase
from tests.jobs.models import SNAPSHOT_KEYS, JobRow, strategy


class Resources:
    """The worker's database and store, and how many jobs were inside their body at once."""

    def __init__(self) -> None:
        self.db: TenantDatabase | None = None
        self._store_engine: AsyncEngine | None = None
        self.active = 0
        self.peak = 0

    async def start(self, url: str) -> None:
        self.db = TenantDatabase(url, strategy(), engine_options={"pool_size": 10})
        await self.db.validate()
        self._store_engine = create_async_engine(url, pool_size=2)
        self.active = self.peak = 0

    async def stop(self) -> None:
        if self.db is not None:
            await self.db.dispose()
        if self._store_engine is not None:
            await self._store_engine.dispose()
        self.db = self._store_engine = None

    async def get(self, tenant_id: str) -> Tenant | None:  # the TenantStore protocol
        assert self._store_engine is not None
        return await SqlAlchemyTenantStore(self._store_engine).get(tenant_id)

    def database(self) -> TenantDatabase:
        assert self.db is not None
        return self.db


resources = Resources()
tenancy = JobTenancy(store=resources, keys=SNAPSHOT_KEYS)


async def _data_path() -> str:
    try:
        async with resources.database().session():
            return "reached"
    except TenantContextError:
        return "refused"


@tenancy.job
async def write_rows(ctx: dict[str, Any], job: int, expected: str, fail: bool = False) -> str:
    resources.active += 1
    resources.peak = max(resources.peak, resources.active)
    try:
        async with resources.database().session() as session:
            session.add(JobRow(job=job, step=1, expected=expected))
            await session.commit()
            await asyncio.sleep(0)  # let the other jobs of the worker run in between
            session.add(JobRow(job=job, step=2, expected=expected))
            await session.commit()
    finally:
        resources.active -= 1
    if fail:
        raise RuntimeError("failed after writing")
    return current_tenant().id


@tenancy.job
async def probe(ctx: dict[str, Any]) -> dict[str, Any]:
    tenant = current_tenant_or_none()
    return {
        "tenant": None if tenant is None else tenant.id,
        "central": in_central_scope(),
        "data": await _data_path(),
    }


@tenancy.central_job(reason="job tests: a central job")
async def central_probe(ctx: dict[str, Any]) -> dict[str, Any]:
    tenant = current_tenant_or_none()
    return {
        "tenant": None if tenant is None else tenant.id,
        "central": in_central_scope(),
        "data": await _data_path(),
    }


FUNCTIONS = [write_rows, probe, central_probe]
