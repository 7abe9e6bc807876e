"""JobTenancy on a real broker: arq's worker (asyncio concurrency) on Redis, PostgreSQL under RLS.

The worker runs in burst mode in this process: it takes every job queued, runs up to
``MAX_JOBS`` at once on one event loop, and returns when the queue is empty. What the jobs wrote
is read back through an admin connection.
"""

from __future__ import annotations

import pickle
import uuid
import warnings
from collections import Counter
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job
from arq.worker import Worker
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_tenancy import Tenant, TenantContextError, TenantNotFound, capture, tenant_scope
from asgi_tenancy.arq import SNAPSHOT_ARGUMENT
from tests.conftest import PgDatabase
from tests.jobs import arq_app
from tests.jobs.conftest import clear_rows, rows_by_tenant, set_status
from tests.jobs.models import SNAPSHOT_KEYS, SUSPENDED_LATER, TENANTS
from tests.redis_server import RedisServer
from tests.unit.test_celery import _tampered

JOBS = 1000
MAX_JOBS = 30


@pytest.fixture
def queue(redis_server: RedisServer) -> str:
    return f"tenancy:arq:{uuid.uuid4().hex[:8]}"


async def _pool(redis_server: RedisServer, queue: str, *, tenancy: bool = True) -> ArqRedis:
    serializer = arq_app.tenancy.job_serializer if tenancy else pickle.dumps
    return await create_pool(
        RedisSettings(port=redis_server.port, database=2),
        job_serializer=serializer,
        default_queue_name=queue,
    )


async def _run_worker(redis_server: RedisServer, queue: str, database: PgDatabase) -> Worker:
    pool = await _pool(redis_server, queue)
    worker = Worker(
        functions=arq_app.FUNCTIONS,
        redis_pool=pool,
        queue_name=queue,
        burst=True,
        max_jobs=MAX_JOBS,
        handle_signals=False,
        poll_delay=0.01,
        job_serializer=arq_app.tenancy.job_serializer,
        keep_result=600,
        on_startup=lambda ctx: arq_app.resources.start(database.app_url),
        on_shutdown=lambda ctx: arq_app.resources.stop(),
    )
    try:
        await worker.main()
    finally:
        with warnings.catch_warnings():
            # arq 0.28 closes its pool with redis-py's deprecated close(): not ours to fix.
            warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
            await worker.close()
    return worker


async def _results(pool: ArqRedis, jobs: list[Job]) -> list[Any]:
    """Each job's return value, or its exception, in order."""
    outcomes = []
    for job in jobs:
        info = await Job(job.job_id, pool).result_info()
        assert info is not None, f"job {job.job_id} has no result"
        outcomes.append(info.result)
    return outcomes


async def test_a_thousand_jobs_of_three_tenants_interleaved_write_only_their_own_rows(
    redis_server: RedisServer, jobs_database: PgDatabase, admin_engine: AsyncEngine, queue: str
) -> None:
    await clear_rows(admin_engine)
    pool = await _pool(redis_server, queue)
    sent: list[tuple[str, int, bool]] = []
    tenant_jobs: list[Job] = []
    probes: list[Job] = []
    unscoped: list[Job] = []
    try:
        for n in range(JOBS):
            tenant = TENANTS[n % len(TENANTS)]
            fail = n % 97 == 0  # fails after writing: the jobs after it must be clean
            async with tenant_scope(Tenant(tenant)):
                job = await pool.enqueue_job("write_rows", n, tenant, fail)
            assert job is not None
            tenant_jobs.append(job)
            sent.append((tenant, n, fail))
            if n % 5 == 0:
                probes.append(await pool.enqueue_job("probe"))  # type: ignore[arg-type]
            if n % 50 == 0:
                unscoped.append(await pool.enqueue_job("write_rows", -1 - n, "nobody"))  # type: ignore[arg-type]

        await _run_worker(redis_server, queue, jobs_database)

        done = await _results(pool, tenant_jobs)
        probed = await _results(pool, probes)
        refused = await _results(pool, unscoped)
    finally:
        await pool.aclose()

    for (tenant, _, fail), result in zip(sent, done, strict=True):
        if fail:
            assert isinstance(result, RuntimeError), result
        else:
            assert result == tenant
    assert all(isinstance(r, TenantContextError) for r in refused), refused
    assert all(p == {"tenant": None, "central": False, "data": "refused"} for p in probed), probed
    assert arq_app.resources.peak > 1  # jobs of several tenants were inside their body at once

    rows = await rows_by_tenant(admin_engine)
    assert all(owner == expected for owner, expected, _, _ in rows), "a row in another tenant"
    counts = Counter((owner, job, step) for owner, _, job, step in rows)
    assert set(counts) == {(t, n, step) for t, n, _ in sent for step in (1, 2)}
    assert set(counts.values()) == {1}
    assert len(rows) == 2 * JOBS


async def test_a_tampered_snapshot_is_refused_and_writes_nothing(
    redis_server: RedisServer, jobs_database: PgDatabase, admin_engine: AsyncEngine, queue: str
) -> None:
    await clear_rows(admin_engine)
    # A producer that writes to the queue without the library: whatever it sends arrives as is.
    raw = await _pool(redis_server, queue, tenancy=False)
    try:
        jobs = []
        for i, snapshot in enumerate(_tampered(SNAPSHOT_KEYS[0])):
            job = await raw.enqueue_job(
                "write_rows", 10_000 + i, "acme", **{SNAPSHOT_ARGUMENT: snapshot}
            )
            assert job is not None
            jobs.append(job)
        with tenant_scope(Tenant("acme")):
            good = capture(key=SNAPSHOT_KEYS[0])
        control = await raw.enqueue_job("write_rows", 20_000, "acme", **{SNAPSHOT_ARGUMENT: good})
        assert control is not None
        await _run_worker(redis_server, queue, jobs_database)
        outcomes = await _results(raw, [*jobs, control])
    finally:
        await raw.aclose()
    assert all(isinstance(o, TenantContextError) for o in outcomes[:-1]), outcomes
    assert outcomes[-1] == "acme"  # the same path with an intact snapshot runs
    assert await rows_by_tenant(admin_engine) == [
        ("acme", "acme", 20_000, 1),
        ("acme", "acme", 20_000, 2),
    ]


async def test_a_tenant_suspended_after_enqueue_fails_with_not_found(
    redis_server: RedisServer, jobs_database: PgDatabase, admin_engine: AsyncEngine, queue: str
) -> None:
    await clear_rows(admin_engine)
    pool = await _pool(redis_server, queue)
    try:
        async with tenant_scope(Tenant(SUSPENDED_LATER)):
            job = await pool.enqueue_job("write_rows", 30_000, SUSPENDED_LATER)
        assert job is not None
        await set_status(admin_engine, SUSPENDED_LATER, "suspended")
        try:
            await _run_worker(redis_server, queue, jobs_database)
        finally:
            await set_status(admin_engine, SUSPENDED_LATER, "active")
        (outcome,) = await _results(pool, [job])
    finally:
        await pool.aclose()
    assert isinstance(outcome, TenantNotFound), outcome
    assert await rows_by_tenant(admin_engine) == []


async def test_a_central_job_runs_central_and_reaches_no_tenant_data(
    redis_server: RedisServer, jobs_database: PgDatabase, queue: str
) -> None:
    pool = await _pool(redis_server, queue)
    try:
        outside = await pool.enqueue_job("central_probe")
        async with tenant_scope(Tenant("acme")):
            inside = await pool.enqueue_job("central_probe")
        assert outside is not None
        assert inside is not None
        await _run_worker(redis_server, queue, jobs_database)
        outcomes = await _results(pool, [outside, inside])
    finally:
        await pool.aclose()
    assert outcomes == [{"tenant": None, "central": True, "data": "refused"}] * 2
