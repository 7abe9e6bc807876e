"""Fixtures of the job tests: a module database with the job table under RLS and a tenants table.

Redis is the session's own (``redis_server`` in tests/conftest.py), PostgreSQL the suite's.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy.sqlalchemy import create_tenants_table, tenants_table
from tests.conftest import PgDatabase
from tests.jobs.models import SUSPENDED_LATER, TENANTS, JobBase, strategy


async def _set_up(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(JobBase.metadata.create_all)
            await strategy().install(conn)
        table = await create_tenants_table(engine)
        async with engine.begin() as conn:
            await conn.execute(insert(table), [{"id": t} for t in (*TENANTS, SUSPENDED_LATER)])
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def jobs_database(pg_database: PgDatabase) -> PgDatabase:
    asyncio.run(_set_up(pg_database.admin_url))
    return pg_database


async def set_status(admin: AsyncEngine, tenant_id: str, status: str) -> None:
    table = tenants_table()
    async with admin.begin() as conn:
        await conn.execute(table.update().where(table.c.id == tenant_id).values(status=status))


async def rows_by_tenant(admin: AsyncEngine) -> list[tuple[str, str, int, int]]:
    """Every job row as the admin sees it: (tenant_id, expected, job, step)."""
    async with admin.connect() as conn:
        result = await conn.execute(
            text("SELECT tenant_id, expected, job, step FROM job_rows ORDER BY id")
        )
        return [(r.tenant_id, r.expected, r.job, r.step) for r in result]


async def clear_rows(admin: AsyncEngine) -> None:
    async with admin.begin() as conn:
        await conn.execute(text("TRUNCATE job_rows"))
